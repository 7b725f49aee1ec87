"""Idle timeouts of TCP routes, in both relay engines: a relay on which nothing moves ends.

``client_idle_timeout_s``: the backend spoke last (or nobody spoke) and the client sends
nothing: an idle kept-alive connection, closed so it no longer vetoes a suspend.
``upstream_idle_timeout_s``: the client spoke last and the backend sends nothing (a hung or
stopped server): the client is reset.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from edge_proxy.service import Proxy, RelayEngine, serve_proxy
from edge_proxy.wake.machine import State
from shared.config.edge import load_edge_config
from tests.support.edge import TEST_TIMEOUT_S, Handler, free_port, read_all, write_config

IDLE_S = 0.5
ENGINES = pytest.mark.parametrize("engine", ["loop", "trio"])


async def echo_forever(stream: trio.SocketStream) -> None:
    """Echo until the peer goes; a reset from the proxy is how an idle relay may end."""
    with contextlib.suppress(trio.BrokenResourceError):
        async with stream:
            while chunk := await stream.receive_some(1 << 16):
                await stream.send_all(chunk)


async def never_answer(stream: trio.SocketStream) -> None:
    """Read the request, then say nothing (a stopped llama-server; probes just connect)."""
    with contextlib.suppress(trio.BrokenResourceError):
        async with stream:
            while await stream.receive_some(1 << 16):
                pass


@asynccontextmanager
async def proxy_with_idle(tmp_path: Path, handler: Handler, engine: RelayEngine,
                          **timeouts: float) -> AsyncIterator[Proxy]:
    backend_port = free_port()
    path = write_config(tmp_path, backend_port, free_port())
    keys = "".join(f"{key} = {value}\n" for key, value in timeouts.items())
    path.write_text(path.read_text().replace('ready = "tcp"\n', f'ready = "tcp"\n{keys}'))
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_tcp, handler, backend_port)
        proxy: Proxy = await nursery.start(
            lambda task_status: serve_proxy(load_edge_config(path), relay_engine=engine,
                                            task_status=task_status))
        while proxy.drivers["box"].state is not State.AWAKE:
            await trio.sleep(0.01)
        yield proxy
        nursery.cancel_scope.cancel()


def idle_closed(proxy: Proxy, side: str) -> float:
    route = proxy.cfg.routes[0].listen
    value = proxy.metrics.registry.get_sample_value(
        "edge_connections_idle_closed_total", {"node": "box", "route": route, "side": side})
    return value or 0.0


@ENGINES
async def test_an_idle_kept_alive_relay_is_closed_and_stops_vetoing_a_suspend(
        tmp_path: Path, engine: RelayEngine) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with proxy_with_idle(tmp_path, echo_forever, engine,
                                   client_idle_timeout_s=IDLE_S) as proxy:
            driver = proxy.drivers["box"]
            stream = await trio.open_tcp_stream(*proxy.route_address())
            for _ in range(3):  # activity keeps it open well past one timeout
                await trio.sleep(IDLE_S / 2)
                await stream.send_all(b"ping")
                assert await stream.receive_some(4) == b"ping"
            start = trio.current_time()
            assert driver.active == 1
            assert not driver.suspending().allowed  # a live relay vetoes
            assert await read_all(stream) == b""  # a normal close, not a reset
            assert trio.current_time() - start >= IDLE_S * 0.9
            await stream.aclose()
            while driver.active:
                await trio.sleep(0.01)
            assert idle_closed(proxy, "client") == 1 and idle_closed(proxy, "upstream") == 0
            assert driver.suspending().allowed


@ENGINES
async def test_a_backend_that_never_answers_is_given_up_on(tmp_path: Path,
                                                           engine: RelayEngine) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with proxy_with_idle(tmp_path, never_answer, engine, upstream_idle_timeout_s=IDLE_S,
                                   client_idle_timeout_s=TEST_TIMEOUT_S) as proxy:
            stream = await trio.open_tcp_stream(*proxy.route_address())
            await stream.send_all(b"GET /health HTTP/1.1\r\nHost: box\r\n\r\n")
            start = trio.current_time()
            with pytest.raises(trio.BrokenResourceError):  # reset: no answer is not an answer
                await read_all(stream)
            assert trio.current_time() - start >= IDLE_S * 0.9
            await stream.aclose()
            while proxy.drivers["box"].active:
                await trio.sleep(0.01)
            assert idle_closed(proxy, "upstream") == 1 and idle_closed(proxy, "client") == 0


@ENGINES
async def test_a_long_silence_of_the_backend_is_fine_below_its_timeout(
        tmp_path: Path, engine: RelayEngine) -> None:
    """A model that thinks longer than client_idle_timeout_s before its first token."""
    async def think_then_answer(stream: trio.SocketStream) -> None:
        async with stream:
            if await stream.receive_some(1 << 16):
                await trio.sleep(IDLE_S * 2)
                await stream.send_all(b"answer")

    with trio.fail_after(TEST_TIMEOUT_S):
        async with proxy_with_idle(tmp_path, think_then_answer, engine,
                                   upstream_idle_timeout_s=TEST_TIMEOUT_S,
                                   client_idle_timeout_s=IDLE_S) as proxy:
            stream = await trio.open_tcp_stream(*proxy.route_address())
            await stream.send_all(b"question")
            assert await read_all(stream) == b"answer"
            await stream.aclose()
