"""shared.sockio and shared.net.open_tcp on real loopback sockets: reads and writes that do
not wait still let other tasks run and still see cancellation; errors are trio's."""

from __future__ import annotations

import errno
import socket
import struct

import pytest
import trio

from shared import sockio
from shared.net import open_tcp

LOOPBACK = "127.0.0.1"


async def _pair() -> tuple[trio.SocketStream, trio.SocketStream, trio.SocketListener]:
    (listener,) = await trio.open_tcp_listeners(0, host=LOOPBACK)
    port = listener.socket.getsockname()[1]
    near = await open_tcp(LOOPBACK, port)
    far = await listener.accept()
    return near, far, listener


async def test_bytes_cross_both_ways_and_eof_reads_empty() -> None:
    near, far, listener = await _pair()
    await sockio.send_all(near, b"hello")
    assert await sockio.receive_some(far, 100) == b"hello"
    await sockio.send_all(far, memoryview(b"back"))
    assert await sockio.receive_some(near, 100) == b"back"
    await near.aclose()
    assert await sockio.receive_some(far, 100) == b""
    await far.aclose()
    await listener.aclose()


async def test_a_read_with_nothing_there_waits_for_the_bytes() -> None:
    near, far, listener = await _pair()
    got: list[bytes] = []
    async with trio.open_nursery() as nursery:
        async def read() -> None:
            got.append(await sockio.receive_some(far, 100))
        nursery.start_soon(read)
        await trio.sleep(0.05)
        assert got == []  # still waiting
        await sockio.send_all(near, b"late")
    assert got == [b"late"]
    for s in (near, far, listener):
        await s.aclose()


async def test_a_write_bigger_than_the_buffers_waits_for_room_and_arrives_whole() -> None:
    near, far, listener = await _pair()
    data = bytes(range(256)) * 40_000  # 10 MB: far more than the socket buffers hold
    received = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sockio.send_all, near, data)
        while len(received) < len(data):
            received += await sockio.receive_some(far, 1 << 16)
    assert received == data
    for s in (near, far, listener):
        await s.aclose()


async def test_calls_that_never_wait_still_let_other_tasks_run() -> None:
    near, far, listener = await _pair()
    ticks = 0

    async def other() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.sleep(0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        await trio.sleep(0)
        before = ticks
        for _ in range(10 * sockio.YIELD_EVERY):  # every write fits at once: none waits
            await sockio.send_all(near, b"x")
        assert ticks - before >= 5
        nursery.cancel_scope.cancel()
    for s in (near, far, listener):
        await s.aclose()


async def test_a_cancelled_task_stops_at_its_next_call_even_when_it_would_not_wait() -> None:
    near, far, listener = await _pair()
    with trio.CancelScope() as scope:
        scope.cancel()
        await sockio.send_all(near, b"never")
        pytest.fail("the write ran in a cancelled scope")
    with trio.move_on_after(0.2) as waited:
        await sockio.receive_some(far, 100)
    assert waited.cancelled_caught  # nothing was written
    for s in (near, far, listener):
        await s.aclose()


async def test_a_closed_socket_and_a_reset_one_raise_trios_errors() -> None:
    near, far, listener = await _pair()
    await near.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await sockio.send_all(near, b"x")
    with pytest.raises(trio.ClosedResourceError):
        await sockio.receive_some(near, 10)
    # an RST from the peer: reading then writing fails as a broken connection
    other = await open_tcp(LOOPBACK, listener.socket.getsockname()[1])
    peer = await listener.accept()
    peer.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await peer.aclose()  # linger 0: the close is a reset
    await trio.sleep(0.05)
    with pytest.raises(trio.BrokenResourceError):
        await sockio.receive_some(other, 10)
    for s in (other, far, listener):
        await s.aclose()


async def test_open_tcp_to_a_closed_port_is_refused_with_its_errno() -> None:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port = s.getsockname()[1]  # bound, never listening: connects are refused
        with pytest.raises(OSError) as caught:
            await open_tcp(LOOPBACK, port)
    assert caught.value.errno == errno.ECONNREFUSED


async def test_open_tcp_sets_nodelay_and_speaks_ipv6_literals() -> None:
    near, far, listener = await _pair()
    assert near.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    for s in (near, far, listener):
        await s.aclose()
    (v6,) = await trio.open_tcp_listeners(0, host="::1")
    stream = await open_tcp("::1", v6.socket.getsockname()[1])
    assert stream.socket.family == socket.AF_INET6
    await stream.aclose()
    await v6.aclose()
