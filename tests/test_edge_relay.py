"""Relaying through the proxy to an awake backend: integrity, half-close, breakage, IPv6."""

from __future__ import annotations

import hashlib
import socket
import struct
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio

from edge_proxy.service import Proxy, RelayEngine, serve_proxy
from edge_proxy.wake.machine import State
from shared.config.edge import load_edge_config
from tests.support.edge import (
    TEST_TIMEOUT_S,
    PacketListener,
    echo_backend,
    free_port,
    load_config,
    read_all,
    write_config,
)

BIG_BYTES = 100 * 1024 * 1024
CHUNK = 1 << 20


# Both relay engines keep one contract: every test here runs on each (see tcp_routes.relay).
_engine: list[RelayEngine] = ["loop"]


@pytest.fixture(autouse=True, params=["loop", "trio"])
def engine(request: pytest.FixtureRequest) -> Iterator[None]:
    _engine[0] = request.param
    yield
    _engine[0] = "loop"


@asynccontextmanager
async def awake_proxy(tmp_path: Path, handler: object, **kwargs: object) -> AsyncIterator[Proxy]:
    """A proxy in front of a running backend, already AWAKE, relaying with the engine of the
    ``engine`` fixture."""
    backend_port = free_port()
    holder: list[Proxy] = []

    async def backend(stream: trio.SocketStream) -> None:
        if not holder or holder[0].drivers["box"].state is not State.AWAKE:
            await stream.aclose()  # the first readiness probe, before the node is AWAKE
            return
        await handler(stream)  # type: ignore[operator]

    async with trio.open_nursery() as nursery:
        packets = await PacketListener.open()
        nursery.start_soon(packets.run)
        await nursery.start(trio.serve_tcp, backend, backend_port)
        cfg = load_config(tmp_path, backend_port, packets.port, **kwargs)  # type: ignore[arg-type]
        proxy: Proxy = await nursery.start(partial(serve_proxy, cfg, relay_engine=_engine[0]))
        holder.append(proxy)
        while proxy.drivers["box"].state is not State.AWAKE:
            await trio.sleep(0.01)
        yield proxy
        nursery.cancel_scope.cancel()


def pattern(i: int) -> bytes:
    return hashlib.sha256(i.to_bytes(8, "big")).digest() * (CHUNK // 32)


async def test_100_mb_up_and_down_arrive_intact(tmp_path: Path) -> None:
    async def digest_then_stream(stream: trio.SocketStream) -> None:
        h = hashlib.sha256()
        while chunk := await stream.receive_some(CHUNK):
            h.update(chunk)
        await stream.send_all(h.digest())
        for i in range(BIG_BYTES // CHUNK):
            await stream.send_all(pattern(i))
        await stream.aclose()

    expected_down = hashlib.sha256()
    for i in range(BIG_BYTES // CHUNK):
        expected_down.update(pattern(i))
    with trio.fail_after(TEST_TIMEOUT_S * 4):
        async with awake_proxy(tmp_path, digest_then_stream) as proxy:
            stream = await trio.open_tcp_stream(*proxy.route_address())
            sent = hashlib.sha256()
            for i in range(BIG_BYTES // CHUNK):
                data = pattern(i + 7)
                sent.update(data)
                await stream.send_all(data)
            await stream.send_eof()
            got = await read_all(stream)
            await stream.aclose()
            assert got[:32] == sent.digest()
            assert len(got) == 32 + BIG_BYTES
            assert hashlib.sha256(got[32:]).digest() == expected_down.digest()
            route = proxy.cfg.routes[0].listen
            reg = proxy.metrics.registry
            assert reg.get_sample_value("edge_bytes_relayed_total",
                                        {"node": "box", "route": route, "direction": "up"}) == BIG_BYTES


async def test_client_half_close_reaches_the_backend_and_the_answer_still_flows(
        tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with awake_proxy(tmp_path, echo_backend) as proxy:
            stream = await trio.open_tcp_stream(*proxy.route_address())
            await stream.send_all(b"first half")
            await stream.send_eof()  # the echo backend answers only once it sees our EOF end
            assert await read_all(stream) == b"first half"
            await stream.aclose()


async def test_backend_half_close_reaches_the_client_which_can_still_send(tmp_path: Path) -> None:
    received: list[bytes] = []

    async def greet_then_listen(stream: trio.SocketStream) -> None:
        await stream.send_all(b"greeting")
        await stream.send_eof()
        received.append(await read_all(stream))
        await stream.aclose()

    with trio.fail_after(TEST_TIMEOUT_S):
        async with awake_proxy(tmp_path, greet_then_listen) as proxy:
            stream = await trio.open_tcp_stream(*proxy.route_address())
            assert await read_all(stream) == b"greeting"  # EOF arrived, the socket is still open
            await stream.send_all(b"late words")
            await stream.send_eof()
            while not received:
                await trio.sleep(0.01)
            assert received == [b"late words"]
            await stream.aclose()


@pytest.mark.parametrize("sent", [100_000, 20_000_000])  # the second one is spliced
async def test_backend_dying_mid_stream_resets_the_client_promptly(tmp_path: Path,
                                                                   sent: int) -> None:
    async def die(stream: trio.SocketStream) -> None:
        await stream.send_all(b"x" * sent)
        await trio.sleep(0.1)
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.aclose()  # RST

    with trio.fail_after(TEST_TIMEOUT_S):
        async with awake_proxy(tmp_path, die) as proxy:
            stream = await trio.open_tcp_stream(*proxy.route_address())
            with pytest.raises(trio.BrokenResourceError):  # never a clean, truncated EOF
                while await stream.receive_some(1 << 16):
                    pass
            await stream.aclose()
            while proxy.counts.open:
                await trio.sleep(0.01)
            assert proxy.drivers["box"].active == 0


async def test_client_dying_mid_stream_closes_the_backend(tmp_path: Path) -> None:
    backend_saw: list[str] = []

    async def stream_forever(stream: trio.SocketStream) -> None:
        try:
            while True:
                await stream.send_all(b"y" * 65536)
        except trio.BrokenResourceError:
            backend_saw.append("broken")

    with trio.fail_after(TEST_TIMEOUT_S):
        async with awake_proxy(tmp_path, stream_forever) as proxy:
            stream = await trio.open_tcp_stream(*proxy.route_address())
            assert await stream.receive_some(1000)
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await stream.aclose()
            while not backend_saw:
                await trio.sleep(0.01)
            assert backend_saw == ["broken"]


async def test_ipv6_listener(tmp_path: Path) -> None:
    backend_port = free_port()
    path = write_config(tmp_path, backend_port, 9)
    path.write_text(path.read_text().replace('listen = "127.0.0.1:0"\nnode', 'listen = "[::1]:0"\nnode'))
    cfg = load_edge_config(path)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_tcp, echo_backend, backend_port)
            proxy: Proxy = await nursery.start(serve_proxy, cfg)
            host, port = proxy.route_address()
            assert host == "::1"
            stream = await trio.open_tcp_stream("::1", port)
            await stream.send_all(b"over v6")
            await stream.send_eof()
            assert await read_all(stream) == b"over v6"
            await stream.aclose()
            nursery.cancel_scope.cancel()
