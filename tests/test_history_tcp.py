"""History on TCP routes: each relayed connection leaves a row with its bytes, duration and
hold, through a real proxy to a real backend on loopback."""

from __future__ import annotations

from pathlib import Path
from typing import Final

import trio

from edge_proxy.history import query
from edge_proxy.service import Proxy, serve_proxy
from edge_proxy.wake.machine import State
from shared.config.edge import load_edge_config
from tests.support.edge import (
    TEST_TIMEOUT_S,
    PacketListener,
    echo_backend,
    free_port,
    read_all,
    serve_backend,
    write_config,
)
from tests.support.edge_http import wait_state
from tests.support.ports import LOOPBACK

PAYLOAD: Final = b"x" * 100_000


async def _echo_through(port: int, payload: bytes) -> bytes:
    stream = await trio.open_tcp_stream(LOOPBACK, port)
    async with stream:
        await stream.send_all(payload)
        await stream.send_eof()
        return await read_all(stream)


async def test_relayed_connections_leave_rows(tmp_path: Path) -> None:
    db = tmp_path / "history.sqlite3"
    backend_port = free_port()
    packets = await PacketListener.open()
    path = write_config(tmp_path, backend_port, packets.port,
                        extra=f'[history]\nenabled = true\npath = "{db}"\n')
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(packets.run)
            proxy: Proxy = await nursery.start(serve_proxy, load_edge_config(path))
            await wait_state(proxy, "box", State.ASLEEP)  # nothing on the backend port yet
            port = proxy.route_address()[1]
            async with trio.open_nursery() as clients:
                got: list[bytes] = []

                async def held_client() -> None:
                    got.append(await _echo_through(port, PAYLOAD))

                clients.start_soon(held_client)
                await packets.arrived.wait()  # the held connection woke the node
                await nursery.start(serve_backend, backend_port, echo_backend)
            assert got == [PAYLOAD]
            assert await _echo_through(port, PAYLOAD[:1234]) == PAYLOAD[:1234]
            nursery.cancel_scope.cancel()
    with query.open_readonly(db) as conn:
        second, first = query.connections(conn)
    assert (first.bytes_up, first.bytes_down) == (len(PAYLOAD), len(PAYLOAD))
    assert first.woke and first.held_ms > 0 and first.duration_ms >= first.held_ms
    assert (second.bytes_up, second.bytes_down) == (1234, 1234)
    assert not second.woke and second.held_ms == 0
    assert (first.node, first.route) == ("box", "127.0.0.1:0")


async def test_no_rows_and_no_file_with_history_off(tmp_path: Path) -> None:
    db = tmp_path / "history.sqlite3"
    backend_port = free_port()
    packets = await PacketListener.open()
    path = write_config(tmp_path, backend_port, packets.port,
                        extra=f'[history]\nenabled = false\npath = "{db}"\n')
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_backend, backend_port, echo_backend)
            proxy: Proxy = await nursery.start(serve_proxy, load_edge_config(path))
            await wait_state(proxy, "box", State.AWAKE)
            assert await _echo_through(proxy.route_address()[1], b"hi") == b"hi"
            nursery.cancel_scope.cancel()
    assert not db.exists()
