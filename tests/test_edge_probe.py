"""Readiness probes against real loopback servers: ready, refused, HTTP 503, and a host that
does not answer at all (a listener with a full accept queue drops SYNs, like a sleeping host)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from edge_proxy.errors import BackendUnavailable
from edge_proxy.probe import check_ready
from edge_proxy.service import Proxy, serve_proxy
from edge_proxy.wake.machine import Event, State
from tests.support.edge import (
    TEST_TIMEOUT_S,
    PacketListener,
    answer_backend,
    free_port,
    load_config,
    request,
    response_for,
    serve_backend,
)

PROBE_TIMEOUT_S = 0.3


@contextmanager
def silent_host() -> Iterator[tuple[int, socket.socket]]:
    """A port whose connects time out: listen(0) plus one connection nobody accepts."""
    with socket.socket() as server, socket.socket() as filler:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = server.getsockname()[1]
        filler.connect(("127.0.0.1", port))
        yield port, server


async def http_backend(statuses: list[int], port: int, *,
                       task_status: trio.TaskStatus[list[trio.SocketListener]]
                       = trio.TASK_STATUS_IGNORED) -> None:
    """Answers GET /health with the next status of ``statuses`` (the last one repeats)."""

    async def handle(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            data += chunk
        status = statuses.pop(0) if len(statuses) > 1 else statuses[0]
        await stream.send_all(f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n".encode())
        await stream.aclose()

    await trio.serve_tcp(handle, port, host="127.0.0.1", task_status=task_status)


async def test_probe_outcomes() -> None:
    port = free_port()
    with pytest.raises(BackendUnavailable) as refused:
        await check_ready("127.0.0.1", port, None, PROBE_TIMEOUT_S)
    assert refused.value.event is Event.PROBE_REFUSED
    with silent_host() as (silent, _):
        with pytest.raises(BackendUnavailable) as silence:
            await check_ready("127.0.0.1", silent, None, PROBE_TIMEOUT_S)
        assert silence.value.event is Event.PROBE_TIMEOUT
        assert "timed out after 0.3 s" in silence.value.reason
    async with trio.open_nursery() as nursery:
        await nursery.start(http_backend, [503, 200], port)
        with pytest.raises(BackendUnavailable, match="GET /health answered 503") as loading:
            await check_ready("127.0.0.1", port, "/health", PROBE_TIMEOUT_S)
        assert loading.value.event is Event.PROBE_REFUSED
        assert await check_ready("127.0.0.1", port, "/health", PROBE_TIMEOUT_S) == \
            "GET /health answered 200"
        assert await check_ready("127.0.0.1", port, None, PROBE_TIMEOUT_S) == \
            f"127.0.0.1:{port} accepts connections"
        nursery.cancel_scope.cancel()


async def test_silent_host_is_asleep_and_a_client_wakes_it(tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT_S), silent_host() as (port, blocker):
        async with trio.open_nursery() as nursery:
            packets = await PacketListener.open()
            nursery.start_soon(packets.run)
            cfg = load_config(tmp_path, port, packets.port, node={"probe_timeout_s": PROBE_TIMEOUT_S})
            proxy: Proxy = await nursery.start(serve_proxy, cfg)
            driver = proxy.drivers["box"]
            while driver.state is not State.ASLEEP:
                await trio.sleep(0.01)
            assert "timed out" in driver.machine.reason
            answers: list[bytes] = []

            async def client() -> None:
                answers.append(await request(proxy.route_address()[1], b"wake up\n"))

            nursery.start_soon(client)
            await packets.wait_for(2)
            assert driver.state is State.WAKING
            blocker.close()  # the host "resumes": its service listens on the port
            await nursery.start(serve_backend, port, answer_backend)
            while not answers:
                await trio.sleep(0.01)
            assert answers == [response_for(b"wake up\n")]
            nursery.cancel_scope.cancel()


async def test_http_readiness_holds_clients_while_the_backend_answers_503(tmp_path: Path) -> None:
    backend_port = free_port()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            packets = await PacketListener.open()
            nursery.start_soon(packets.run)
            cfg = load_config(tmp_path, backend_port, packets.port, ready="http:/health")
            proxy: Proxy = await nursery.start(serve_proxy, cfg)
            driver = proxy.drivers["box"]
            statuses = [503] * 5 + [200]
            stream = await trio.open_tcp_stream(*proxy.route_address())
            await stream.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            await packets.wait_for(1)
            await nursery.start(http_backend, statuses, backend_port)
            while len(statuses) > 1:  # the probes see every 503 before the 200
                assert driver.state is State.WAKING and driver.held == 1
                await trio.sleep(0.01)
            answer = await stream.receive_some(4096)
            assert answer.startswith(b"HTTP/1.1 200")
            assert driver.state is State.AWAKE
            await stream.aclose()
            nursery.cancel_scope.cancel()
