"""Models on demand through each kind of route, with a real node-agent (two on-demand
instances of real llama-servers on tiny models, a budget that holds one) and a real proxy:
a streaming request told what it waits for, a plain TCP route held for its instance's load,
and a request after a TTL unload the proxy did not hear of."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final

import httpx
import pytest
import trio

from edge_proxy.history import query
from edge_proxy.loading import ModelState
from edge_proxy.service import Proxy, serve_proxy
from edge_proxy.wake.machine import State as NodeState
from inference_node.agent import Agent
from inference_node.supervisor import State
from shared.config.edge import load_edge_config
from tests.support.edge import PacketListener
from tests.support.edge_http import POLL_S, TEST_TIMEOUT_S, sse_payloads, wait_state
from tests.support.ondemand import (
    Node,
    agent_running,
    answered,
    chat,
    instance_states,
    slow_binary,
    write_node,
)
from tests.support.ports import LOOPBACK
from tests.support.supervised import wait_state as wait_instance

pytestmark = pytest.mark.llama

# The wrapper's sleep before llama-server starts: a load that outlasts several comment
# intervals (waking_comment_interval_s = 0.05), so the comments are sure to go out.
LOAD_DELAY_S: Final = 1.0
TTL_S: Final = 1.0


@asynccontextmanager
async def stack(node: Node, packets: PacketListener
                ) -> AsyncIterator[tuple[Agent, Proxy]]:
    """The node's agent and its proxy, running; yielded once the proxy has the node AWAKE
    and the agent's model list."""
    async with trio.open_nursery() as nursery, agent_running(node.agent_cfg) as agent:
        nursery.start_soon(packets.run)
        proxy: Proxy = await nursery.start(serve_proxy, load_edge_config(node.proxy_cfg))
        await wait_state(proxy, "box", NodeState.AWAKE)
        await proxy_knows_models(proxy)
        yield agent, proxy
        nursery.cancel_scope.cancel()


async def proxy_knows_models(proxy: Proxy) -> None:
    """Until the proxy has the agent's list, with each instance's port."""
    while not proxy.gates["box"].table.models or any(
            m.port is None for m in proxy.gates["box"].table.models.values()):
        await trio.sleep(POLL_S)


async def test_a_streaming_request_for_an_unloaded_model_is_told_it_loads_then_answered(
        tmp_path: Path, llama_server_bin: Path) -> None:
    packets = await PacketListener.open()
    db = tmp_path / "history.sqlite3"
    node = write_node(tmp_path, slow_binary(tmp_path, llama_server_bin, LOAD_DELAY_S),
                      packets.port, history=db)
    url = f"http://{LOOPBACK}:{node.listens['tiny-a']}"
    with trio.fail_after(TEST_TIMEOUT_S):
        async with stack(node, packets) as (agent, _):
            async with httpx.AsyncClient(timeout=TEST_TIMEOUT_S) as client, client.stream(
                    "POST", f"{url}/v1/chat/completions",
                    json=chat("tiny-a", stream=True)) as response:
                lines = [line async for line in response.aiter_lines() if line]
            assert await instance_states(agent) == {"tiny-a": "loaded", "tiny-b": "unloaded"}
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    first_data = next(i for i, line in enumerate(lines) if line.startswith("data: "))
    comments = lines[:first_data]
    assert comments, lines
    # every line before the first event is a comment naming the model that loads
    assert all(c.startswith(": loading tiny-a ") for c in comments), comments
    events = sse_payloads(lines)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["model"] == "tiny-a" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert packets.packets == []
    # its history row: held for the load alone (the node was awake), then answered
    with query.open_readonly(db) as conn:
        (row,) = [r for r in query.requests(conn) if r.path == "/v1/chat/completions"]
    assert (row.outcome, row.model, row.status) == ("loaded", "tiny-a", 200)
    assert row.held_ms >= LOAD_DELAY_S * 1000 * 0.9


async def test_a_tcp_route_to_an_on_demand_instance_holds_the_connection_until_it_loads(
        tmp_path: Path, llama_server_bin: Path) -> None:
    packets = await PacketListener.open()
    node = write_node(tmp_path, llama_server_bin, packets.port, protocol="tcp")
    body = json.dumps(chat("tiny-b")).encode()
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: box\r\nconnection: close\r\n"
               b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
               % (len(body), body))
    with trio.fail_after(TEST_TIMEOUT_S):
        async with stack(node, packets) as (agent, proxy):
            assert agent.supervisor.get("inst-b").state is State.STOPPED
            stream = await trio.open_tcp_stream(LOOPBACK, node.listens["tiny-b"])
            async with stream:
                await stream.send_all(request)  # sent while held: delivered once loaded
                answer = b"".join([chunk async for chunk in stream])
            assert await instance_states(agent) == {"tiny-a": "unloaded", "tiny-b": "loaded"}
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), answer[:300]
    reply = json.loads(payload)
    assert reply["model"] == "tiny-b" and reply["choices"][0]["finish_reason"] == "length"
    assert proxy.loader.loads == {("box", "tiny-b"): 1}


async def test_a_model_unloaded_by_its_ttl_behind_the_proxys_back_is_loaded_again(
        tmp_path: Path, llama_server_bin: Path) -> None:
    packets = await PacketListener.open()
    node = write_node(tmp_path, llama_server_bin, packets.port, ttl_s=TTL_S)
    url = f"http://{LOOPBACK}:{node.listens['tiny-a']}"
    with trio.fail_after(TEST_TIMEOUT_S):
        async with stack(node, packets) as (agent, proxy):
            gate = proxy.gates["box"]
            async with httpx.AsyncClient(timeout=TEST_TIMEOUT_S) as client:
                answered(await client.post(f"{url}/v1/chat/completions",
                                           json=chat("tiny-a")), "tiny-a")
                await wait_instance(agent.supervisor, "inst-a", State.STOPPED)  # its TTL
                assert agent.supervisor.get("inst-a").reason.startswith("idle for ttl")
                # What the proxy holds true when a refresh of the list has not come yet (one
                # runs every few seconds): the model loaded, as its last load said.
                gate.table.loaded("tiny-a")
                assert gate.table.models["tiny-a"].state is ModelState.LOADED
                answered(await client.post(f"{url}/v1/chat/completions",
                                           json=chat("tiny-a")), "tiny-a")
            assert await instance_states(agent) == {"tiny-a": "loaded", "tiny-b": "unloaded"}
    assert proxy.loader.loads == {("box", "tiny-a"): 2}
    # the refused port was the model gone, not the node: no wake, no magic packet
    assert proxy.drivers["box"].machine.last_wake is None
    assert packets.packets == []


async def test_the_proxy_hears_of_a_ttl_unload_before_the_instance_stops(
        tmp_path: Path, llama_server_bin: Path) -> None:
    """The agent's ``unloading`` event reaches the proxy before its instance leaves READY:
    no request goes to an exiting llama-server, and the next one loads the model first."""
    packets = await PacketListener.open()
    node = write_node(tmp_path, llama_server_bin, packets.port, ttl_s=TTL_S, tell_proxy=True)
    url = f"http://{LOOPBACK}:{node.listens['tiny-a']}"
    seen_at_stop: list[ModelState] = []
    with trio.fail_after(TEST_TIMEOUT_S):
        async with stack(node, packets) as (agent, proxy):
            table = proxy.gates["box"].table

            def on_state(name: str, old: State, new: State, reason: str) -> None:
                if name == "inst-a" and old is State.READY and reason.startswith("idle for ttl"):
                    # what the proxy holds true right then
                    seen_at_stop.append(table.models["tiny-a"].state)

            agent.supervisor.add_state_listener(on_state)
            async with httpx.AsyncClient(timeout=TEST_TIMEOUT_S) as client:
                answered(await client.post(f"{url}/v1/chat/completions",
                                           json=chat("tiny-a")), "tiny-a")
                assert table.models["tiny-a"].state is ModelState.LOADED
                await wait_instance(agent.supervisor, "inst-a", State.STOPPED)  # its TTL
                assert agent.supervisor.get("inst-a").reason.startswith("idle for ttl")
                answered(await client.post(f"{url}/v1/chat/completions",
                                           json=chat("tiny-a")), "tiny-a")
    assert seen_at_stop == [ModelState.UNLOADED]
    assert proxy.loader.loads == {("box", "tiny-a"): 2}
    assert packets.packets == []


async def test_an_instance_that_closes_without_answering_is_loaded_again_not_a_502(
        tmp_path: Path, llama_server_bin: Path) -> None:
    packets = await PacketListener.open()
    node = write_node(tmp_path, llama_server_bin, packets.port)
    url = f"http://{LOOPBACK}:{node.listens['tiny-a']}"
    agent_url = load_edge_config(node.proxy_cfg).nodes["box"].agent_url
    accepted: list[int] = []

    async def exiting_llama_server(sock: trio.socket.SocketType) -> None:
        """What a llama-server that is exiting does to a request that reaches it: the
        connection is accepted, then closed without a byte; then the port closes."""
        with sock:
            conn, _ = await sock.accept()
            accepted.append(1)
            conn.close()

    with trio.fail_after(TEST_TIMEOUT_S):
        async with stack(node, packets) as (agent, proxy), trio.open_nursery() as nursery:
            gate = proxy.gates["box"]
            async with httpx.AsyncClient(timeout=TEST_TIMEOUT_S) as client:
                answered(await client.post(f"{url}/v1/chat/completions",
                                           json=chat("tiny-a")), "tiny-a")
                unloaded = await client.post(f"{agent_url}/v1/models/tiny-a/unload")
                assert unloaded.status_code == 200, unloaded.text
                sock = trio.socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                await sock.bind((LOOPBACK, node.ports["tiny-a"]))
                sock.listen(1)
                nursery.start_soon(exiting_llama_server, sock)
                gate.table.loaded("tiny-a")  # the proxy has not heard of the unload yet
                answered(await client.post(f"{url}/v1/chat/completions",
                                           json=chat("tiny-a")), "tiny-a")
            assert accepted == [1]
            assert await instance_states(agent) == {"tiny-a": "loaded", "tiny-b": "unloaded"}
    assert proxy.loader.loads == {("box", "tiny-a"): 2}
    assert proxy.drivers["box"].machine.last_wake is None
