"""HTTP routes in front of a backend that accepts and then never answers (a SIGSTOPped
llama-server): the request ends after the route's ``upstream_idle_timeout_s``, as a 504
from the proxy before the answer's head, as a cut stream after it, and nothing stays counted
as in flight (which would veto every suspend).
"""

from __future__ import annotations

import contextlib
import json
import signal
from functools import partial
from pathlib import Path

import httpx
import psutil
import pytest
import trio

from edge_proxy.service import Proxy, serve_proxy
from edge_proxy.wake.machine import State
from shared.config.edge import load_edge_config
from tests.support.edge import read_line
from tests.support.edge_http import (
    SERVER_ARGS,
    TEST_TIMEOUT_S,
    NodeSpec,
    wait_state,
    write_http_config,
)
from tests.support.llama import child_process
from tests.support.ports import LOOPBACK, free_port

IDLE_S = 0.5
HEALTH_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n{\"status\":\"ok\"}"
STREAM_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n" b"f\r\ndata: {\"a\":1}\n\n\r\n")


class Backend:
    """Raw HTTP on loopback: the first ``GET /health`` (the readiness probe) is answered;
    after that every request is read and then left without an answer, or, for a chat
    request, given the start of an SSE stream that then stops."""

    def __init__(self) -> None:
        self.answered = 0
        self.waiting = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            request_line = await read_line(stream)
            while await read_line(stream) not in (b"\r\n", b""):
                pass
            if not request_line:
                return
            if request_line.startswith(b"GET /health") and not self.answered:
                self.answered += 1
                await stream.send_all(HEALTH_OK)
                return
            if request_line.startswith(b"POST /v1/chat"):
                await stream.send_all(STREAM_HEAD)
            self.waiting += 1
            await trio.sleep_forever()


async def start(nursery: trio.Nursery, tmp_path: Path) -> tuple[Proxy, str]:
    node = NodeSpec("box", "aa:bb:cc:dd:ee:01", free_port())
    path = write_http_config(tmp_path, [node], free_port())
    path.write_text(path.read_text().replace(
        'protocol = "http"\n', f'protocol = "http"\nupstream_idle_timeout_s = {IDLE_S}\n'))
    backend = Backend()
    await nursery.start(partial(trio.serve_tcp, backend.handle, node.port, host=LOOPBACK))
    proxy: Proxy = await nursery.start(serve_proxy, load_edge_config(path))
    await wait_state(proxy, "box", State.AWAKE)
    return proxy, proxy.http_routes.url("127.0.0.1:0")


def in_flight(proxy: Proxy) -> int:
    listener = next(iter(proxy.http_routes.listeners.values()))
    return sum(b.upstream.in_flight for b in listener.app.backends.values())


async def settled(proxy: Proxy) -> None:
    while proxy.drivers["box"].active or in_flight(proxy) or proxy.counts.open:
        await trio.sleep(0.01)


async def test_a_backend_that_never_answers_is_a_504_from_the_proxy(tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            proxy, url = await start(nursery, tmp_path)
            async with httpx.AsyncClient(base_url=url, timeout=TEST_TIMEOUT_S) as client:
                started = trio.current_time()
                response = await client.get("/health")
                assert trio.current_time() - started >= IDLE_S * 0.9
            assert response.status_code == 504
            error = json.loads(response.content)["error"]
            assert error["source"] == "edge-proxy" and error["type"] == "upstream_timeout"
            assert "box:" in error["message"] and "upstream_idle_timeout_s" in error["message"]
            await settled(proxy)
            assert proxy.drivers["box"].suspending().allowed
            nursery.cancel_scope.cancel()


async def test_a_client_that_leaves_a_hung_request_leaves_nothing_in_flight(
        tmp_path: Path) -> None:
    """The HTTP server does not notice a client leaving while the answer is pending: it is
    the idle timeout that ends the request and frees the node to suspend."""
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            proxy, url = await start(nursery, tmp_path)
            async with httpx.AsyncClient(base_url=url, timeout=IDLE_S / 5) as client:
                with pytest.raises(httpx.ReadTimeout):
                    await client.get("/health")
            await settled(proxy)
            assert proxy.drivers["box"].suspending().allowed
            nursery.cancel_scope.cancel()


async def test_a_stream_that_stops_is_cut_for_the_client(tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            proxy, url = await start(nursery, tmp_path)
            lines: list[str] = []
            started = trio.current_time()
            async with httpx.AsyncClient(base_url=url, timeout=TEST_TIMEOUT_S) as client:
                with pytest.raises(httpx.RemoteProtocolError):  # no last chunk: visibly cut
                    async with client.stream("POST", "/v1/chat/completions", json={
                            "messages": [{"role": "user", "content": "hi"}],
                            "stream": True}) as response:
                        assert response.status_code == 200
                        async for line in response.aiter_lines():
                            lines.append(line)
            assert lines[:1] == ['data: {"a":1}']
            assert trio.current_time() - started >= IDLE_S * 0.9
            await settled(proxy)
            nursery.cancel_scope.cancel()


async def healthy(url: str) -> None:
    """Until llama-server answers 200 (it binds before its model is loaded)."""
    async with httpx.AsyncClient(timeout=TEST_TIMEOUT_S) as client:
        while True:
            with contextlib.suppress(httpx.TransportError):
                if (await client.get(url)).status_code == 200:
                    return
            await trio.sleep(0.05)


@pytest.mark.llama
async def test_a_sigstopped_llama_server_is_a_504_and_leaves_nothing_in_flight(
        tmp_path: Path, llama_server_bin: Path, tiny_model: Path) -> None:
    node = NodeSpec("box", "aa:bb:cc:dd:ee:01", free_port())
    # every poll goes to the node (not only one per poll_refresh_s): the second is the probe
    path = write_http_config(tmp_path, [node], free_port(), http="poll_refresh_s = 0")
    path.write_text(path.read_text().replace(
        'protocol = "http"\n', f'protocol = "http"\nupstream_idle_timeout_s = {IDLE_S}\n'))
    command = [llama_server_bin, "-m", tiny_model, "--host", LOOPBACK, "--port", str(node.port),
               *SERVER_ARGS]
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery, child_process(command) as (server, _):
            await healthy(f"http://{LOOPBACK}:{node.port}/health")
            proxy: Proxy = await nursery.start(serve_proxy, load_edge_config(path))
            await wait_state(proxy, "box", State.AWAKE)
            url = proxy.http_routes.url("127.0.0.1:0")
            async with httpx.AsyncClient(base_url=url, timeout=TEST_TIMEOUT_S) as client:
                assert (await client.get("/health")).status_code == 200
                server.send_signal(signal.SIGSTOP)
                try:
                    while psutil.Process(server.pid).status() != psutil.STATUS_STOPPED:
                        await trio.sleep(0.01)  # every thread stopped, not just the first
                    response = await client.get("/health")
                    assert response.status_code == 504
                    assert json.loads(response.content)["error"]["type"] == "upstream_timeout"
                    await settled(proxy)
                    assert proxy.drivers["box"].suspending().allowed
                finally:
                    server.send_signal(signal.SIGCONT)
            nursery.cancel_scope.cancel()
