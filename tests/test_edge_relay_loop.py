"""The relay loop thread with real loopback TCP connections: alone, and failing inside a proxy."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from pathlib import Path

import pytest
import trio

from edge_proxy.errors import LoopStopped
from edge_proxy.service import Proxy, serve_proxy
from edge_proxy.tcp_routes.relay_loop import RelayLoop
from edge_proxy.tcp_routes.relay_thread import CLIENT_GONE
from edge_proxy.wake.machine import State
from tests.support.edge import TEST_TIMEOUT_S, echo_backend, free_port, load_config, read_all


async def connected_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """Two ends of one loopback TCP connection."""
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with listener:
        port = listener.socket.getsockname()[1]
        near = await trio.open_tcp_stream("127.0.0.1", port)
        far = await listener.accept()
    return near, far


async def test_a_cancelled_relay_leaves_the_loop_and_others_go_on() -> None:
    loop = RelayLoop()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(loop.run)
            relays = []
            for _ in range(2):
                client, proxy_in = await connected_pair()
                proxy_out, backend = await connected_pair()
                relays.append((client, proxy_in, proxy_out, backend))
            outcomes: list[str] = []
            scopes = [trio.CancelScope(), trio.CancelScope()]

            async def run(i: int) -> None:
                _, proxy_in, proxy_out, _ = relays[i]
                with scopes[i]:
                    outcomes.append(await loop.relay(proxy_in, proxy_out))
                    return
                outcomes.append("cancelled")

            for i in range(2):
                nursery.start_soon(run, i)
            client, _, _, backend = relays[0]
            await client.send_all(b"ping")
            assert await backend.receive_some(4) == b"ping"
            scopes[0].cancel()
            while not outcomes:
                await trio.sleep(0.01)
            assert outcomes == ["cancelled"]
            # the sockets are ours again: closing them cannot disturb the loop
            for stream in relays[0]:
                await stream.aclose()
            client, _, _, backend = relays[1]
            await client.send_all(b"still here")
            await client.send_eof()
            assert await read_all(backend) == b"still here"
            await backend.send_all(b"bye")
            await backend.send_eof()
            assert await read_all(client) == b"bye"
            while len(outcomes) < 2:
                await trio.sleep(0.01)
            assert outcomes == ["cancelled", "done"]
            nursery.cancel_scope.cancel()
    for stream in relays[1]:
        await stream.aclose()


class Injected(RuntimeError):
    """The fault a test makes the loop thread raise."""


async def test_a_failing_loop_ends_every_relay_and_never_writes_its_closed_pipe() -> None:
    loop = RelayLoop()
    armed = False

    def count(way: str, n: int) -> None:  # runs in the loop thread
        if armed:
            raise Injected("byte counter failed")

    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(loop.run)
            relays = []
            for _ in range(2):
                client, proxy_in = await connected_pair()
                proxy_out, backend = await connected_pair()
                relays.append((client, proxy_in, proxy_out, backend))
            outcomes: list[str] = []

            async def run(i: int) -> None:
                outcomes.append(await loop.relay(relays[i][1], relays[i][2], count=count))

            for i in range(2):
                nursery.start_soon(run, i)
            for client, _, _, backend in relays:
                await client.send_all(b"ping")
                assert await backend.receive_some(4) == b"ping"
            armed = True
            await relays[0][0].send_eof()  # the EOF passes the count on: the counter raises
            with trio.fail_after(1.0):  # every relay is told at once, not just the failing one
                while len(outcomes) < 2:
                    await trio.sleep(0.01)
            assert all(o.startswith("broken: the relay loop failed: Injected(") for o in outcomes)
            assert isinstance(loop.failure, Injected) and not loop.running
            with pytest.raises(LoopStopped):
                await loop.relay(relays[1][1], relays[1][2])
            # the wake pipe's number now belongs to someone else's socket: stopping the loop
            # must not write its wake-up byte there
            wake_w = loop._wake_w
            mine, theirs = socket.socketpair()
            if theirs.fileno() == wake_w:
                mine, theirs = theirs, mine
            moved = mine.fileno() != wake_w
            if moved:
                os.dup2(mine.fileno(), wake_w)
            nursery.cancel_scope.cancel()
    try:
        theirs.setblocking(False)
        with pytest.raises(BlockingIOError):
            theirs.recv(1)
    finally:
        if moved:
            os.close(wake_w)
        for sock in (mine, theirs):
            sock.close()
        for streams in relays:
            for stream in streams:
                await stream.aclose()


async def test_a_loop_that_fails_while_a_relay_is_cancelled_lets_it_go() -> None:
    loop = RelayLoop()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(loop.run)
            client, proxy_in = await connected_pair()
            proxy_out, backend = await connected_pair()
            scope = trio.CancelScope()
            returned = trio.Event()

            async def run() -> None:
                with scope:
                    await loop.relay(proxy_in, proxy_out)
                returned.set()

            nursery.start_soon(run)
            await client.send_all(b"ping")
            assert await backend.receive_some(4) == b"ping"

            def broken_commands() -> bool:
                raise Injected("command handling failed")

            loop._thread._commands_run = broken_commands  # type: ignore[method-assign]
            scope.cancel()  # its "remove" makes the loop raise instead of acknowledging
            with trio.fail_after(1.0):
                await returned.wait()
            assert isinstance(loop.failure, Injected)
            nursery.cancel_scope.cancel()
    for stream in (client, proxy_in, proxy_out, backend):
        await stream.aclose()


async def tolerant_echo(stream: trio.SocketStream) -> None:
    """``echo_backend`` that takes being reset by the proxy in its stride."""
    with contextlib.suppress(trio.BrokenResourceError):
        await echo_backend(stream)


async def test_through_the_proxy_a_loop_failure_closes_clients_and_new_ones_are_served(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    backend_port = free_port()
    cfg = load_config(tmp_path, backend_port, free_port())
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_tcp, tolerant_echo, backend_port)
            proxy: Proxy = await nursery.start(serve_proxy, cfg)
            while proxy.drivers["box"].state is not State.AWAKE:
                await trio.sleep(0.01)
            port = proxy.route_address()[1]
            clients = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(3)]
            for client in clients:
                await client.send_all(b"hello")
                assert await client.receive_some(5) == b"hello"

            def broken_update(entry: object) -> None:
                raise Injected("epoll failed")

            proxy.relay_loop._thread._update = broken_update  # type: ignore[method-assign,assignment]
            await clients[0].send_eof()  # a half-close changes what the loop waits for
            with trio.fail_after(1.0):
                for client in clients:
                    with contextlib.suppress(trio.BrokenResourceError):  # reset, or EOF
                        assert await read_all(client) in (b"", b"hello")
            assert "relay loop failed" in caplog.text and "Injected('epoll failed')" in caplog.text
            assert proxy.status()["relay_engine"] == \
                "trio (the relay loop failed: Injected('epoll failed'))"
            fresh = await trio.open_tcp_stream("127.0.0.1", port)  # the trio engine serves it
            await fresh.send_all(b"after")
            await fresh.send_eof()
            assert await read_all(fresh) == b"after"
            await fresh.aclose()
            while proxy.drivers["box"].active:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    for client in clients:
        await client.aclose()


async def test_an_answer_whose_client_left_ends_as_client_gone_not_broken() -> None:
    """A failed write to the client is told apart from a backend that broke off: the route
    counts the first as a client that left, the second as an upstream error."""
    loop = RelayLoop()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(loop.run)
            outcomes = []
            for client_leaves in (True, False):
                client, proxy_in = await connected_pair()
                proxy_out, backend = await connected_pair()
                if client_leaves:  # a reset: the loop's first write to it fails
                    client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                             struct.pack("ii", 1, 0))
                    await client.aclose()
                    await trio.sleep(0.05)
                    await backend.send_all(b"5\r\nhello\r\n")
                else:  # the backend closes before the answer's end
                    await backend.send_all(b"5\r\nhel")
                    await backend.aclose()
                outcomes.append(await loop.pass_answer(proxy_in, proxy_out, lambda _: None))
                for stream in (client, proxy_in, proxy_out, backend):
                    await stream.aclose()
            nursery.cancel_scope.cancel()
    gone, broken = outcomes
    assert gone.startswith(CLIENT_GONE + ": the client's connection broke"), gone
    assert broken.startswith("broken down: BrokenAnswer"), broken
