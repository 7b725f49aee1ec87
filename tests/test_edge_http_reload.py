"""An HTTP listener's life: reloading its config in place (nodes join and leave, models change,
requests route by the new table at once) and a graceful stop that lets streams finish."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio

from edge_proxy.service import Proxy, serve_proxy
from edge_proxy.wake.machine import State
from shared.config.edge import load_edge_config
from tests.support.edge import PacketListener
from tests.support.edge_http import (
    SERVER_ARGS,
    TEST_TIMEOUT_S,
    NodeSpec,
    Waker,
    llama_on_port,
    packets_for,
    sse_payloads,
    wait_state,
    write_http_config,
)
from tests.support.ports import free_port

pytestmark = pytest.mark.llama

STREAM_TOKENS = 1000  # about a second of generation: still running when the stop comes


async def test_a_reload_adds_and_removes_nodes_behind_a_running_listener(
        tmp_path: Path, llama_server_bin: Path, tiny_model: Path) -> None:
    alpha = NodeSpec("alpha-box", "aa:bb:cc:dd:ee:0a", free_port(), ("alpha",))
    beta = NodeSpec("beta-box", "aa:bb:cc:dd:ee:0b", free_port(), ("beta",))
    more_alpha = NodeSpec(alpha.name, alpha.mac, alpha.port, ("alpha", "alpha-2"))
    packets = await PacketListener.open()
    listen = f"127.0.0.1:{free_port()}"

    def config(*routed: NodeSpec) -> Path:
        return write_http_config(tmp_path, [alpha, beta], packets.port, listen=listen,
                                 routed=routed)

    async def listed(client: httpx.AsyncClient) -> list[str]:
        return [m["id"] for m in (await client.get("/v1/models")).json()["data"]]

    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(packets.run)
            proxy: Proxy = await nursery.start(serve_proxy, load_edge_config(config(alpha)))
            await wait_state(proxy, "beta-box", State.ASLEEP)
            async with httpx.AsyncClient(base_url=f"http://{listen}",
                                         timeout=TEST_TIMEOUT_S) as client:
                assert await listed(client) == ["alpha"]

                await proxy.reload(load_edge_config(config(more_alpha, beta)))
                assert await listed(client) == ["alpha", "alpha-2", "beta"]
                waker = Waker(beta, llama_server_bin, tiny_model, (*SERVER_ARGS, "--alias", "beta"))
                nursery.start_soon(waker.run, packets)
                chat = {"model": "beta", "messages": [{"role": "user", "content": "hi"}],
                        "max_tokens": 3}
                answer = await client.post("/v1/chat/completions", json=chat)
                assert answer.status_code == 200, answer.text
                assert answer.json()["model"] == "beta"
                assert packets_for(packets, alpha.mac) == 0

                await proxy.reload(load_edge_config(config(alpha)))
                assert await listed(client) == ["alpha"]
                assert proxy.http_routes.listeners[listen].app.models.table.nodes == ("alpha-box",)
            nursery.cancel_scope.cancel()


async def test_a_graceful_stop_lets_a_running_stream_finish(
        tmp_path: Path, llama_server_bin: Path, tiny_model: Path) -> None:
    node = NodeSpec("box", "aa:bb:cc:dd:ee:01", free_port())
    path = write_http_config(tmp_path, [node], free_port())
    request = {"messages": [{"role": "user", "content": "hi"}], "stream": True,
               "max_tokens": STREAM_TOKENS, "ignore_eos": True}
    stopped = trio.Event()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with (
            trio.open_nursery() as nursery,
            llama_on_port(llama_server_bin, tiny_model, node.port),
        ):
            async def run(task_status: trio.TaskStatus[Proxy]) -> None:
                await serve_proxy(load_edge_config(path), task_status=task_status)
                stopped.set()

            proxy: Proxy = await nursery.start(run)
            await wait_state(proxy, "box", State.AWAKE)
            url = proxy.http_routes.url("127.0.0.1:0")
            async with (
                httpx.AsyncClient(timeout=TEST_TIMEOUT_S) as client,
                client.stream("POST", f"{url}/v1/chat/completions", json=request) as response,
            ):
                stream = response.aiter_lines()
                lines = [await anext(stream)]
                proxy.stop()
                lines += [line async for line in stream]
            assert sse_payloads(lines)[-1] == "[DONE]"
            assert len(sse_payloads(lines)) > STREAM_TOKENS // 2
            await stopped.wait()
            with pytest.raises(httpx.ConnectError):
                await httpx.AsyncClient().get(f"{url}/health")
            nursery.cancel_scope.cancel()
