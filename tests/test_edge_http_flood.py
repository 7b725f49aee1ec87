"""Floods on an HTTP route: a burst of clients far past the held-request limit is served or
refused with a count, never reset by the kernel or dropped without a trace; and requests in
flight show in the proxy's status, per route and per node.

Everything is real: the clients are raw sockets on loopback, the backend is a few lines of
HTTP on a real port that starts listening only when the node's magic packet arrives.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
from collections import Counter
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, Final

import httpx
import pytest
import trio

from edge_proxy.cli import format_status
from edge_proxy.metrics import (
    NETSTAT_PATH,
    ProxyMetrics,
    listen_overflows,
    watch_listen_overflows,
)
from edge_proxy.service import Proxy, serve_proxy
from edge_proxy.wake.machine import State
from shared.config.edge import load_edge_config
from tests.support.edge import PacketListener, read_all, read_line
from tests.support.edge_http import (
    TOKEN,
    NodeSpec,
    packets_for,
    wait_state,
    write_http_config,
)
from tests.support.ports import LOOPBACK, free_port

CLIENTS: Final = 1000
MAX_HELD: Final = 200  # far below CLIENTS: most of the burst meets the held-request limit
# Bounds that stop a hung test on a loaded machine, never a timing check.
FLOOD_TIMEOUT_S: Final = 120.0
TEST_TIMEOUT_S: Final = 30.0
# The accept-queue watcher, checking often; connects that the kernel drops wait this long.
DROP_CHECK_S: Final = 0.2
DROP_WAIT_S: Final = 3.0
KNOCKS: Final = 20
OK: Final = b'{"ok":true}'
# struct tcp_info (linux/tcp.h): 8 bytes of u8 fields, then u32 rto, ato, snd_mss, rcv_mss,
# unacked, sacked: for a listening socket the kernel puts its backlog in tcpi_sacked.
TCPI_SACKED_OFFSET: Final = 28
TCP_INFO_BYTES: Final = 104
REQUEST: Final = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n"
                  b"Content-Type: application/json\r\nContent-Length: 15\r\n\r\n"
                  b'{"messages":[]}')

Handler = Callable[[trio.SocketStream], Awaitable[None]]


def tiny_backend(gate: trio.Event | None = None) -> Handler:
    """HTTP/1.1 keep-alive: ``GET /health`` is 200, any other request 200 ``OK`` (after
    ``gate``, if given)."""
    async def handle(stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError):  # the proxy's client left
            await serve(stream)

    async def serve(stream: trio.SocketStream) -> None:
        async with stream:
            while request_line := await read_line(stream):
                length = 0
                while (line := await read_line(stream)) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                while length > 0:
                    length -= len(await stream.receive_some(length))
                if gate is not None and not request_line.startswith(b"GET /health"):
                    await gate.wait()
                await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                      b"Content-Length: %d\r\n\r\n" % len(OK) + OK)
    return handle


async def one_client(port: int, results: Counter[str]) -> None:
    """One request, read to the end; the outcome is its status or what went wrong."""
    try:
        stream = await trio.open_tcp_stream(LOOPBACK, port)
        async with stream:
            await stream.send_all(REQUEST)
            raw = await read_all(stream)
    except (ConnectionResetError, trio.BrokenResourceError):
        results["reset"] += 1
        return
    except OSError as exc:
        results[f"error {exc.strerror}"] += 1
        return
    results[raw.split(b" ", 2)[1].decode() if raw.startswith(b"HTTP/1.1 ") else "no answer"] += 1


def sample(proxy: Proxy, name: str, labels: dict[str, str]) -> float:
    return proxy.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_a_burst_past_the_held_limit_is_served_or_refused_with_a_count(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="edge_proxy.http_routes")
    node = NodeSpec("box", "aa:bb:cc:dd:ee:01", free_port())
    packets = await PacketListener.open()
    path = write_http_config(tmp_path, [node], packets.port, node_extra=f"max_held = {MAX_HELD}")
    results: Counter[str] = Counter()
    with trio.fail_after(FLOOD_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(packets.run)
            proxy: Proxy = await nursery.start(serve_proxy, load_edge_config(path))
            await wait_state(proxy, "box", State.ASLEEP)
            port = int(proxy.http_routes.url("127.0.0.1:0").rsplit(":", 1)[1])

            async def wake() -> None:
                # The box wakes once every client is held or answered: then exactly
                # MAX_HELD are held and the rest met the limit, however the burst arrived.
                await packets.wait_for(1)
                while proxy.drivers["box"].held + sum(results.values()) < CLIENTS:
                    await trio.sleep(0.02)
                await trio.serve_tcp(tiny_backend(), node.port, host=LOOPBACK)

            nursery.start_soon(wake)
            async with trio.open_nursery() as clients:
                for _ in range(CLIENTS):
                    clients.start_soon(one_client, port, results)
            nursery.cancel_scope.cancel()
    assert results["reset"] == 0 and results["no answer"] == 0, results
    assert results == {"200": MAX_HELD, "503": CLIENTS - MAX_HELD}
    refused = sample(proxy, "edge_http_refused_total",
                     {"route": "127.0.0.1:0", "reason": "held_limit"})
    assert refused == results["503"]
    assert packets_for(packets, node.mac) >= 1
    lines = [r.getMessage() for r in caplog.records if "refused (held_limit)" in r.getMessage()]
    assert 1 <= len(lines) < results["503"]  # rate-limited, not one line per refusal
    assert "max_held 200" in lines[0]


async def control(proxy: Proxy) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=proxy.control_url, timeout=TEST_TIMEOUT_S) as ctl:
        reply = await ctl.get("/status", headers={"authorization": f"Bearer {TOKEN}"})
    assert reply.status_code == 200
    status: dict[str, Any] = reply.json()
    return status


async def test_status_counts_http_requests_in_flight_per_route_and_node(
        tmp_path: Path) -> None:
    awake = NodeSpec("awake", "aa:bb:cc:dd:ee:01", free_port(), ("qwen",))
    asleep = NodeSpec("asleep", "aa:bb:cc:dd:ee:02", free_port(), ("llama",))
    packets = await PacketListener.open()
    path = write_http_config(tmp_path, [awake, asleep], packets.port)
    gate = trio.Event()
    answers: list[int] = []
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(packets.run)
            await nursery.start(partial(trio.serve_tcp, tiny_backend(gate), awake.port,
                                        host=LOOPBACK))
            proxy: Proxy = await nursery.start(serve_proxy, load_edge_config(path))
            await wait_state(proxy, "awake", State.AWAKE)
            await wait_state(proxy, "asleep", State.ASLEEP)
            url = proxy.http_routes.url("127.0.0.1:0")

            async def ask(model: str) -> None:
                async with httpx.AsyncClient(base_url=url, timeout=TEST_TIMEOUT_S) as client:
                    answer = await client.post("/v1/chat/completions",
                                               json={"model": model, "messages": []})
                    answers.append(answer.status_code)

            async with trio.open_nursery() as requests:
                for model in ("qwen", "qwen", "llama"):
                    requests.start_soon(ask, model)
                while proxy.drivers["asleep"].held < 1 or proxy.drivers["awake"].active < 2:
                    await trio.sleep(0.02)
                status = await control(proxy)
                requests.cancel_scope.cancel()
            gate.set()
            route = status["routes"][0]
            assert route["requests_in_flight"] == 3
            assert route["nodes"]["awake"]["in_flight"] == 2
            assert route["nodes"]["asleep"]["in_flight"] == 1
            assert status["connections_open"] == 3
            table = format_status(status).splitlines()
            assert any(line.startswith(f"route 127.0.0.1:0 -> awake:{awake.port}, asleep:")
                       and line.endswith("(http, 3 request(s) in flight: awake 2, asleep 1)")
                       for line in table), table
            async with httpx.AsyncClient(base_url=url, timeout=TEST_TIMEOUT_S) as client:
                assert (await client.post("/v1/chat/completions",
                                          json={"model": "qwen"})).status_code == 200
            after = await control(proxy)
            assert after["routes"][0]["requests_in_flight"] == 0
            assert after["routes"][0]["nodes"]["awake"]["in_flight"] == 0
            nursery.cancel_scope.cancel()


def accept_queue_size(port: int) -> int:
    """The accept-queue size of this process's socket listening on ``port``, as the kernel
    reports it for a listener in ``TCP_INFO`` (``tcpi_sacked``: the backlog it granted)."""
    for fd in os.listdir("/proc/self/fd"):
        try:
            sock = socket.socket(fileno=os.dup(int(fd)))
        except OSError:
            continue
        with sock:
            try:
                if sock.type != socket.SOCK_STREAM or sock.family != socket.AF_INET \
                        or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) \
                        or sock.getsockname()[1] != port:
                    continue
            except OSError:
                continue
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_BYTES)
            sacked: int = struct.unpack_from("I", info, TCPI_SACKED_OFFSET)[0]
            return sacked
    raise AssertionError(f"no socket of this process listens on port {port}")


async def test_an_http_route_has_the_accept_queue_of_a_tcp_route(tmp_path: Path) -> None:
    node = NodeSpec("box", "aa:bb:cc:dd:ee:01", free_port())
    path = write_http_config(tmp_path, [node], free_port())
    path.write_text(path.read_text() + f'\n[[routes]]\nlisten = "127.0.0.1:0"\nnode = "box"\n'
                    f"backend_port = {node.port}\n")
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            proxy: Proxy = await nursery.start(serve_proxy, load_edge_config(path))
            http_port = int(proxy.http_routes.url("127.0.0.1:0").rsplit(":", 1)[1])
            tcp_port = next(iter(proxy.routes.values())).addresses[0][1]
            tcp_queue = accept_queue_size(tcp_port)
            assert accept_queue_size(http_port) == tcp_queue >= CLIENTS
            nursery.cancel_scope.cancel()


def test_the_kernels_listen_overflows_are_read_from_netstat() -> None:
    text = ("TcpExt: SyncookiesSent ListenOverflows ListenDrops\nTcpExt: 3 41 41\n"
            "IpExt: InNoRoutes\nIpExt: 0\n")
    assert listen_overflows(text) == 41
    assert listen_overflows("IpExt: InNoRoutes\nIpExt: 0\n") is None
    if NETSTAT_PATH.exists():  # Linux: the real file parses, and the metric is exported
        assert listen_overflows(NETSTAT_PATH.read_text()) is not None
        assert ProxyMetrics().registry.get_sample_value("edge_host_listen_overflows_total") \
            is not None


async def test_drops_at_a_full_accept_queue_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="edge_proxy.metrics")
    crowded = socket.socket()
    crowded.bind((LOOPBACK, 0))
    crowded.listen(0)  # never accepted: its queue fills at once and the kernel drops the rest
    port = crowded.getsockname()[1]

    async def knock() -> None:
        with trio.socket.socket() as sock, trio.move_on_after(DROP_WAIT_S):
            await sock.connect((LOOPBACK, port))
            await trio.sleep_forever()  # hold the queue slot it got

    def logged() -> list[str]:
        return [r.getMessage() for r in caplog.records if "full accept queue" in r.getMessage()]

    with crowded, trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_listen_overflows, DROP_CHECK_S)
            await trio.sleep(DROP_CHECK_S / 2)  # the watcher has read the count before
            for _ in range(KNOCKS):
                nursery.start_soon(knock)
            while not logged():
                await trio.sleep(DROP_CHECK_S / 2)
            nursery.cancel_scope.cancel()
    assert "whole host" in logged()[0] and "net.core.somaxconn" in logged()[0]
