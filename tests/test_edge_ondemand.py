"""Models on demand through the proxy: a real node-agent with two on-demand instances of
real llama-servers on tiny models and a memory budget that holds one, and a real proxy in
front (one HTTP route per instance, each on a port of its own or all on one). The node "sleeps" by having no agent running; a magic
packet starts it. Needs the agent's on-demand instances and API (inference_node.ondemand)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Final

import httpx
import pytest
import trio

from edge_proxy.history import query
from edge_proxy.service import Proxy, serve_proxy
from edge_proxy.wake.machine import State
from inference_node.agent import Agent
from shared.config.edge import load_edge_config
from tests.support.edge import PacketListener, expected_packet
from tests.support.edge_http import POLL_S, TEST_TIMEOUT_S, sse_payloads, wait_state
from tests.support.ondemand import (
    BIG,
    MAC,
    MODELS,
    agent_metric,
    agent_running,
    answered,
    chat,
    instance_states,
    write_node,
)
from tests.support.ports import LOOPBACK

pytestmark = pytest.mark.llama

CONCURRENT: Final = 20


async def listed_by_proxy(url: str) -> set[str]:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{url}/v1/models")
    return {m["id"] for m in response.json()["data"]} if response.status_code == 200 else set()


async def test_the_first_request_loads_a_model_and_the_other_model_evicts_it(
        tmp_path: Path, llama_server_bin: Path) -> None:
    packets = await PacketListener.open()
    node = write_node(tmp_path, llama_server_bin, packets.port)
    url = {m: f"http://{LOOPBACK}:{p}" for m, p in node.listens.items()}
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery, agent_running(node.agent_cfg) as agent:
            nursery.start_soon(packets.run)
            proxy: Proxy = await nursery.start(serve_proxy, load_edge_config(node.proxy_cfg))
            await wait_state(proxy, "box", State.AWAKE)
            while await listed_by_proxy(url["tiny-a"]) != set(MODELS):
                await trio.sleep(POLL_S)  # learned from the agent, loaded or not
            assert await instance_states(agent) == {"tiny-a": "unloaded", "tiny-b": "unloaded"}
            async with httpx.AsyncClient(timeout=TEST_TIMEOUT_S) as client:
                answered(await client.post(f"{url['tiny-a']}/v1/chat/completions",
                                           json=chat("tiny-a")), "tiny-a")
                assert await instance_states(agent) == {"tiny-a": "loaded",
                                                        "tiny-b": "unloaded"}
                # no idle connection kept to an instance on demand (it would slow its exit)
                upstream = proxy.http_routes.listeners[f"127.0.0.1:{node.listens['tiny-a']}"] \
                    .app.backends["box"].upstream
                assert not upstream.keep_alive and repr(upstream).endswith("idle=0>")
                async with client.stream("POST", f"{url['tiny-b']}/v1/chat/completions",
                                         json=chat("tiny-b", stream=True)) as response:
                    lines = [line async for line in response.aiter_lines()]
            assert response.status_code == 200
            # (": loading tiny-b N s" comments go out only when the load outlasts
            # waking_comment_interval_s; a tiny model may load sooner)
            events = sse_payloads(lines)
            assert events[-1] == "[DONE]"
            assert json.loads(events[0])["model"] == "tiny-b"
            assert await instance_states(agent) == {"tiny-a": "unloaded", "tiny-b": "loaded"}
            assert 'result="ok"} 1.0' in await agent_metric(agent, 'model="tiny-b"')
            assert proxy.loader.loads == {("box", "tiny-a"): 1, ("box", "tiny-b"): 1}
            assert packets.packets == []  # an awake node is never sent a packet
            nursery.cancel_scope.cancel()


async def test_one_url_for_both_models_routes_each_request_to_its_instance(
        tmp_path: Path, llama_server_bin: Path) -> None:
    packets = await PacketListener.open()
    node = write_node(tmp_path, llama_server_bin, packets.port, one_url=True)
    (listen,) = set(node.listens.values())
    url = f"http://{LOOPBACK}:{listen}"
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery, agent_running(node.agent_cfg) as agent:
            nursery.start_soon(packets.run)
            proxy: Proxy = await nursery.start(serve_proxy, load_edge_config(node.proxy_cfg))
            await wait_state(proxy, "box", State.AWAKE)
            while await listed_by_proxy(url) != set(MODELS):
                await trio.sleep(POLL_S)  # the union of both routes, learned from the agent
            app = proxy.http_routes.listeners[f"127.0.0.1:{listen}"].app
            # each model on the route whose backend_port is its instance's
            assert {key: app.models.table.served_by(key) for key in app.backends} == {
                f"box:{node.ports[m]}": (m,) for m in MODELS}
            async with httpx.AsyncClient(timeout=TEST_TIMEOUT_S) as client:
                for model in ("tiny-a", "tiny-b", "tiny-a"):
                    answered(await client.post(f"{url}/v1/chat/completions",
                                               json=chat(model)), model)
                    other = next(m for m in MODELS if m != model)
                    assert await instance_states(agent) == {model: "loaded",
                                                            other: "unloaded"}
                unknown = await client.post(f"{url}/v1/chat/completions", json=chat("tiny-c"))
            assert unknown.status_code == 404
            assert unknown.json()["error"]["code"] == "model_not_found"
            assert proxy.loader.loads == {("box", "tiny-a"): 2, ("box", "tiny-b"): 1}
            assert packets.packets == []
            nursery.cancel_scope.cancel()


async def test_concurrent_requests_for_one_unloaded_model_load_it_once(
        tmp_path: Path, llama_server_bin: Path) -> None:
    packets = await PacketListener.open()
    node = write_node(tmp_path, llama_server_bin, packets.port)
    url = f"http://{LOOPBACK}:{node.listens['tiny-a']}"
    answers: list[httpx.Response] = []
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery, agent_running(node.agent_cfg) as agent:
            nursery.start_soon(packets.run)
            proxy: Proxy = await nursery.start(serve_proxy, load_edge_config(node.proxy_cfg))
            await wait_state(proxy, "box", State.AWAKE)
            while not proxy.gates["box"].table.models:
                await trio.sleep(POLL_S)
            async with httpx.AsyncClient(timeout=TEST_TIMEOUT_S) as client:
                async def one() -> None:
                    answers.append(await client.post(f"{url}/v1/chat/completions",
                                                     json=chat("tiny-a")))

                async with trio.open_nursery() as requests:
                    for _ in range(CONCURRENT):
                        requests.start_soon(one)
            assert len(answers) == CONCURRENT
            for response in answers:
                answered(response, "tiny-a")
            assert proxy.loader.loads == {("box", "tiny-a"): 1}
            # the agent saw one load that did the work (joiners of it are not counted again)
            assert 'llamanap_ondemand_loads_total{model="tiny-a",result="ok"} 1.0' in \
                await agent_metric(agent, "llamanap_ondemand_loads_total")
            nursery.cancel_scope.cancel()


async def test_a_sleeping_node_is_woken_once_then_the_model_loads(
        tmp_path: Path, llama_server_bin: Path) -> None:
    packets = await PacketListener.open()
    node = write_node(tmp_path, llama_server_bin, packets.port)
    url = f"http://{LOOPBACK}:{node.listens['tiny-b']}"
    started: list[Agent] = []

    async def wake_on_packet() -> None:
        while not any(data == expected_packet(MAC) for _, data in packets.packets):
            await packets.arrived.wait()
        async with agent_running(node.agent_cfg) as agent:
            started.append(agent)
            await trio.sleep_forever()

    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(packets.run)
            nursery.start_soon(wake_on_packet)
            proxy: Proxy = await nursery.start(serve_proxy, load_edge_config(node.proxy_cfg))
            await wait_state(proxy, "box", State.ASLEEP)
            async with httpx.AsyncClient(timeout=TEST_TIMEOUT_S) as client, client.stream(
                    "POST", f"{url}/v1/chat/completions",
                    json=chat("tiny-b", stream=True)) as response:
                lines = [line async for line in response.aiter_lines()]
            assert response.status_code == 200
            comments = [line for line in lines if line.startswith(":")]
            assert comments and comments[0].startswith(": waking box ")  # the agent starts
            assert all(c.startswith((": waking box ", ": loading tiny-b ")) for c in comments)
            events = sse_payloads(lines)
            assert events[-1] == "[DONE]" and json.loads(events[0])["model"] == "tiny-b"
            assert len(started) == 1
            assert await instance_states(started[0]) == {"tiny-a": "unloaded",
                                                         "tiny-b": "loaded"}
            assert proxy.loader.loads == {("box", "tiny-b"): 1}
            wakes = proxy.http_routes.metrics.wakes.labels(f"127.0.0.1:{node.listens['tiny-b']}",
                                                           "box", "other")
            assert wakes._value.get() == 1
            nursery.cancel_scope.cancel()


async def test_a_model_that_cannot_load_is_an_openai_error_naming_it_and_why(
        tmp_path: Path, llama_server_bin: Path) -> None:
    packets = await PacketListener.open()
    db = tmp_path / "history.sqlite3"
    node = write_node(tmp_path, llama_server_bin, packets.port, big=True, history=db)
    url = f"http://{LOOPBACK}:{node.listens[BIG]}"
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery, agent_running(node.agent_cfg):
            nursery.start_soon(packets.run)
            proxy: Proxy = await nursery.start(serve_proxy, load_edge_config(node.proxy_cfg))
            await wait_state(proxy, "box", State.AWAKE)
            while not proxy.gates["box"].table.models:
                await trio.sleep(POLL_S)
            async with httpx.AsyncClient(timeout=TEST_TIMEOUT_S) as client:
                plain = await client.post(f"{url}/v1/chat/completions", json=chat(BIG))
                async with client.stream("POST", f"{url}/v1/chat/completions",
                                         json=chat(BIG, stream=True)) as response:
                    lines = [line async for line in response.aiter_lines()]
            assert plain.status_code == 503
            error = plain.json()["error"]
            assert error["source"] == "edge-proxy" and error["code"] == "model_not_loaded"
            assert error["message"].startswith(f"model {BIG} on node box did not load: the "
                                               "agent answered 409: ")
            # streaming: the same error as one SSE event (comments may have started it)
            streamed = [json.loads(p) for p in sse_payloads(lines)]
            assert response.status_code in (200, 503)
            assert streamed[-1]["error"]["message"] == error["message"] if streamed else \
                response.status_code == 503
            nursery.cancel_scope.cancel()
    with query.open_readonly(db) as conn:  # both rows say why they failed
        rows = [r for r in query.requests(conn) if r.path == "/v1/chat/completions"]
    assert [(r.outcome, r.model) for r in rows] == [("load_failed", BIG)] * 2
