"""The proxy as a whole: reload under traffic, graceful shutdown, a port in use."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trio

from edge_proxy.errors import ListenError
from edge_proxy.service import Proxy, first_user_error, serve_proxy
from edge_proxy.wake.machine import State
from shared.config.edge import load_edge_config
from tests.support.edge import TEST_TIMEOUT_S, echo_backend, free_port, read_all, write_config

CHUNK = b"0123456789abcdef" * 4096  # 64 KiB


def config_with_listen(tmp_path: Path, backend_port: int, *ports: int, grace: float = 10) -> Path:
    path = write_config(tmp_path, backend_port, 9, routes=len(ports),
                        extra=f"[limits]\nshutdown_grace_s = {grace}")
    text = path.read_text()
    for port in ports:
        text = text.replace('listen = "127.0.0.1:0"\nnode', f'listen = "127.0.0.1:{port}"\nnode', 1)
    path.write_text(text)
    return path


async def echo_round(stream: trio.SocketStream, data: bytes) -> bytes:
    await stream.send_all(data)
    got = b""
    while len(got) < len(data):
        chunk = await stream.receive_some(1 << 16)
        assert chunk, "relay closed"
        got += chunk
    return got


async def wait_awake(proxy: Proxy) -> None:
    while proxy.drivers["box"].state is not State.AWAKE:
        await trio.sleep(0.01)


async def test_reload_under_traffic_opens_new_routes_closes_old_and_keeps_relays(
        tmp_path: Path) -> None:
    backend_port, port_a, port_b = free_port(), free_port(), free_port()
    path = config_with_listen(tmp_path, backend_port, port_a)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_tcp, echo_backend, backend_port)
            proxy: Proxy = await nursery.start(serve_proxy, load_edge_config(path))
            await wait_awake(proxy)
            stream = await trio.open_tcp_stream("127.0.0.1", port_a)
            rounds = 0
            reloaded = trio.Event()

            async def traffic() -> None:
                nonlocal rounds
                while not reloaded.is_set() or rounds < 20:
                    assert await echo_round(stream, CHUNK) == CHUNK
                    rounds += 1
                    await trio.sleep(0)

            async with trio.open_nursery() as clients:
                clients.start_soon(traffic)
                while rounds < 5:
                    await trio.sleep(0.01)
                config_with_listen(tmp_path, backend_port, port_b)
                await proxy.reload(load_edge_config(path))
                reloaded.set()
            assert rounds >= 20  # the relay kept going across the reload
            with pytest.raises(OSError):
                await trio.open_tcp_stream("127.0.0.1", port_a)
            fresh = await trio.open_tcp_stream("127.0.0.1", port_b)
            assert await echo_round(fresh, b"new route") == b"new route"
            await fresh.aclose()
            await stream.send_eof()
            assert await read_all(stream) == b""
            await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_stop_refuses_new_clients_and_lets_relays_finish(tmp_path: Path) -> None:
    backend_port, port = free_port(), free_port()
    path = config_with_listen(tmp_path, backend_port, port)
    finished = trio.Event()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_tcp, echo_backend, backend_port)

            async def run(task_status: trio.TaskStatus[Proxy] = trio.TASK_STATUS_IGNORED) -> None:
                await serve_proxy(load_edge_config(path), task_status=task_status)
                finished.set()

            proxy: Proxy = await nursery.start(run)
            await wait_awake(proxy)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            assert await echo_round(stream, b"before") == b"before"
            proxy.stop()
            await trio.sleep(0.1)
            with pytest.raises(OSError):
                await trio.open_tcp_stream("127.0.0.1", port)
            assert not finished.is_set()
            assert await echo_round(stream, b"during grace") == b"during grace"
            await stream.send_eof()
            assert await read_all(stream) == b""
            await stream.aclose()
            await finished.wait()
            nursery.cancel_scope.cancel()


async def test_stop_closes_relays_after_the_grace_period(tmp_path: Path) -> None:
    backend_port, port = free_port(), free_port()
    path = config_with_listen(tmp_path, backend_port, port, grace=0.2)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_tcp, echo_backend, backend_port)
            proxy: Proxy = await nursery.start(serve_proxy, load_edge_config(path))
            await wait_awake(proxy)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            assert await echo_round(stream, b"hi") == b"hi"
            proxy.stop()
            assert await read_all(stream) == b""  # closed by the proxy once the grace ran out
            await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_a_port_in_use_is_one_line_naming_the_route(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path = config_with_listen(tmp_path, free_port(), port)
        with pytest.raises(BaseExceptionGroup) as caught:
            async with trio.open_nursery() as nursery:
                await nursery.start(serve_proxy, load_edge_config(path))
    error = first_user_error(caught.value)
    assert isinstance(error, ListenError)
    assert str(error) == (f"route 127.0.0.1:{port}: cannot listen: Address already in use; "
                          "stop the other program or pick another port")


async def test_reload_moves_a_route_to_another_backend_and_drops_a_removed_nodes_held(
        tmp_path: Path) -> None:
    old_backend, new_backend, port = free_port(), free_port(), free_port()
    path = config_with_listen(tmp_path, old_backend, port)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_tcp, echo_backend, new_backend)
            proxy: Proxy = await nursery.start(serve_proxy, load_edge_config(path))
            held = await trio.open_tcp_stream("127.0.0.1", port)  # old backend is down: held
            while proxy.drivers["box"].held != 1:
                await trio.sleep(0.01)
            # the same listener now fronts another node (and port); "box" leaves the config
            text = path.read_text().replace("[nodes.box]", "[nodes.other]").replace(
                'node = "box"', 'node = "other"').replace(f"backend_port = {old_backend}",
                                                          f"backend_port = {new_backend}")
            path.write_text(text)
            await proxy.reload(load_edge_config(path))
            assert set(proxy.drivers) == {"other"}
            with pytest.raises(trio.BrokenResourceError):  # the held client is let go
                await read_all(held)
            await held.aclose()
            while proxy.drivers["other"].state is not State.AWAKE:
                await trio.sleep(0.01)
            fresh = await trio.open_tcp_stream("127.0.0.1", port)
            assert await echo_round(fresh, b"to the new node") == b"to the new node"
            await fresh.aclose()
            nursery.cancel_scope.cancel()
