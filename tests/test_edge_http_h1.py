"""The HTTP routes' HTTP/1.1 server on real loopback sockets, with a small handler: requests
in order on one connection, bad requests, keep-alive expiry, 100-continue, and a stop that
closes idle connections at once and lets a request in flight finish."""

from __future__ import annotations

import trio

from shared.h1 import Client, H1Server, Scope
from tests.support.ports import LOOPBACK

TEST_TIMEOUT_S = 10.0


async def echo(scope: Scope, client: Client) -> None:
    """Answers ``METHOD PATH BODY``; ``/slow`` first sleeps 0.3 s."""
    body = b""
    while (piece := await client.receive_body()) is not None:
        body += piece
    if scope["path"] == "/slow":
        await trio.sleep(0.3)
    answer = f"{scope['method']} {scope['path']} ".encode() + body
    await client.start(200, [(b"content-length", str(len(answer)).encode())], answer, end=True)


async def start(nursery: trio.Nursery, *, keep_alive_s: float = 5.0, grace_s: float = 5.0
                ) -> tuple[int, trio.Event]:
    stop = trio.Event()
    listeners = await trio.open_tcp_listeners(0, host=LOOPBACK)
    server = H1Server(echo, keep_alive_s=keep_alive_s, grace_s=grace_s)
    nursery.start_soon(server.serve, listeners, stop.wait)
    return listeners[0].socket.getsockname()[1], stop


async def read_all(stream: trio.SocketStream) -> bytes:
    data = b""
    while piece := await stream.receive_some(65536):
        data += piece
    return data


async def test_pipelined_requests_are_answered_in_order() -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            port, _ = await start(nursery)
            stream = await trio.open_tcp_stream(LOOPBACK, port)
            await stream.send_all(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\na"
                                  b"GET /two HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = await read_all(stream)
            assert answer.index(b"POST /slow a") < answer.index(b"GET /two ")
            assert answer.count(b"HTTP/1.1 200") == 2
            nursery.cancel_scope.cancel()


async def test_a_bad_request_gets_400_and_the_connection_closes() -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            port, _ = await start(nursery)
            stream = await trio.open_tcp_stream(LOOPBACK, port)
            await stream.send_all(b"NOT HTTP AT ALL\r\n\r\n")
            answer = await read_all(stream)  # returns: the server closed
            assert answer.startswith(b"HTTP/1.1 400") and b"connection: close" in answer.lower()
            nursery.cancel_scope.cancel()


async def test_an_idle_connection_closes_after_keep_alive_s() -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            port, _ = await start(nursery, keep_alive_s=0.2)
            stream = await trio.open_tcp_stream(LOOPBACK, port)
            await stream.send_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
            began = trio.current_time()
            answer = await read_all(stream)
            assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"GET /a ")
            assert 0.15 < trio.current_time() - began < 2.0
            nursery.cancel_scope.cancel()


async def test_expect_100_continue_is_answered_before_the_body() -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            port, _ = await start(nursery)
            stream = await trio.open_tcp_stream(LOOPBACK, port)
            await stream.send_all(b"POST /b HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                                  b"Content-Length: 3\r\nConnection: close\r\n\r\n")
            assert (await stream.receive_some(65536)).startswith(b"HTTP/1.1 100")
            await stream.send_all(b"xyz")
            assert (await read_all(stream)).endswith(b"POST /b xyz")
            nursery.cancel_scope.cancel()


async def test_a_stop_closes_idle_connections_and_lets_a_request_finish() -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            port, stop = await start(nursery)
            idle = await trio.open_tcp_stream(LOOPBACK, port)
            busy = await trio.open_tcp_stream(LOOPBACK, port)
            await busy.send_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            await trio.sleep(0.1)  # both accepted, the slow one under way
            stop.set()
            assert await read_all(idle) == b""  # closed at once, nothing sent
            answer = await read_all(busy)  # answered, then closed
            assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"GET /slow ")
            with trio.move_on_after(0.5) as late:  # no new connections
                refused = False
                try:
                    await trio.open_tcp_stream(LOOPBACK, port)
                except OSError:
                    refused = True
            assert refused and not late.cancelled_caught
            nursery.cancel_scope.cancel()
