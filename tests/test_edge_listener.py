"""TCP routes end to end on loopback: hold while the backend is down, wake, deliver; limits."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import httpx
import pytest
import trio

from edge_proxy.service import Proxy, serve_proxy
from edge_proxy.wake.machine import State
from edge_proxy.wake.wol import PACKET_BYTES
from tests.support.edge import (
    TEST_TIMEOUT_S,
    PacketListener,
    answer_backend,
    echo_backend,
    expected_packet,
    free_port,
    load_config,
    read_all,
    request,
    response_for,
    serve_backend,
)

WOL_INTERVAL_S = 0.2  # as in tests.support.edge.write_config
CLIENTS = 200


def sample(proxy: Proxy, name: str, **labels: str) -> float:
    value = proxy.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def wait_until(predicate: object) -> None:
    assert callable(predicate)
    while not predicate():
        await trio.sleep(0.01)


async def test_down_backend_is_woken_and_the_held_request_delivered(tmp_path: Path) -> None:
    backend_port = free_port()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            packets = await PacketListener.open()
            nursery.start_soon(packets.run)
            proxy: Proxy = await nursery.start(serve_proxy,
                                               load_config(tmp_path, backend_port, packets.port))
            port = proxy.route_address()[1]
            answers: list[bytes] = []

            async def client() -> None:
                answers.append(await request(port, b"hello while asleep\n"))

            nursery.start_soon(client)
            await packets.wait_for(3)
            assert proxy.drivers["box"].state is State.WAKING
            assert proxy.drivers["box"].held == 1
            await nursery.start(serve_backend, backend_port, answer_backend)
            await wait_until(lambda: answers)
            assert answers == [response_for(b"hello while asleep\n")]
            for _, packet in packets.packets:
                assert len(packet) == PACKET_BYTES == 102
                assert packet == expected_packet()
            times = [t for t, _ in packets.packets]
            # resent at the interval, never sooner
            assert all(b - a >= WOL_INTERVAL_S * 0.9 for a, b in itertools.pairwise(times))
            assert proxy.drivers["box"].state is State.AWAKE
            assert sample(proxy, "edge_wakes_total", node="box", outcome="ready") == 1
            async with httpx.AsyncClient() as http:
                text = (await http.get(proxy.control_url + "/metrics")).text
            route = proxy.cfg.routes[0].listen
            for line in [
                'edge_wakes_total{node="box",outcome="ready"} 1.0',
                'edge_wake_duration_seconds_count{node="box"} 1.0',
                f'edge_magic_packets_sent_total{{node="box"}} {len(packets.packets)}.0',
                f'edge_connections_total{{node="box",route="{route}"}} 1.0',
                f'edge_connections_held{{node="box",route="{route}"}} 0.0',
                f'edge_connections_timed_out_total{{node="box",route="{route}"}} 0.0',
                f'edge_connections_refused_total{{node="box",route="{route}"}} 0.0',
                'edge_node_state{node="box",state="AWAKE"} 1.0',
                f'edge_bytes_relayed_total{{direction="up",node="box",route="{route}"}} '
                f'{len(b"hello while asleep")+1}.0',
                f'edge_bytes_relayed_total{{direction="down",node="box",route="{route}"}} '
                f'{len(answers[0])}.0',
            ]:
                assert line in text.splitlines(), line
            nursery.cancel_scope.cancel()


async def test_200_clients_share_one_wake(tmp_path: Path) -> None:
    backend_port = free_port()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            packets = await PacketListener.open()
            nursery.start_soon(packets.run)
            proxy: Proxy = await nursery.start(serve_proxy,
                                               load_config(tmp_path, backend_port, packets.port))
            port = proxy.route_address()[1]
            answers: dict[int, bytes] = {}

            async def client(i: int) -> None:
                answers[i] = await request(port, f"client {i}\n".encode())

            started = trio.current_time()
            async with trio.open_nursery() as clients:
                for i in range(CLIENTS):
                    clients.start_soon(client, i)
                await wait_until(lambda: proxy.drivers["box"].held == CLIENTS)
                await packets.wait_for(2)
                await clients.start(serve_backend, backend_port, answer_backend)
                await wait_until(lambda: len(answers) == CLIENTS)
                clients.cancel_scope.cancel()
            elapsed = trio.current_time() - started
            assert all(answers[i] == response_for(f"client {i}\n".encode()) for i in range(CLIENTS))
            # one wake: packets bounded by the time it took, not by the number of clients
            assert len(packets.packets) <= elapsed / WOL_INTERVAL_S + 2
            assert sample(proxy, "edge_wakes_total", node="box", outcome="ready") == 1
            assert sample(proxy, "edge_magic_packets_sent_total", node="box") == len(packets.packets)
            nursery.cancel_scope.cancel()


async def test_wake_timeout_closes_held_clients_and_counts_them(tmp_path: Path) -> None:
    backend_port = free_port()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            packets = await PacketListener.open()
            nursery.start_soon(packets.run)
            cfg = load_config(tmp_path, backend_port, packets.port, node={"wake_timeout_s": 0.6})
            proxy: Proxy = await nursery.start(serve_proxy, cfg)
            stream = await trio.open_tcp_stream("127.0.0.1", proxy.route_address()[1])
            await stream.send_all(b"anyone there?\n")
            with pytest.raises(trio.BrokenResourceError):  # reset, not a clean (empty) answer
                await read_all(stream)
            await stream.aclose()
            route = proxy.cfg.routes[0].listen
            assert sample(proxy, "edge_connections_timed_out_total", node="box", route=route) == 1
            assert sample(proxy, "edge_wakes_total", node="box", outcome="timeout") == 1
            assert proxy.drivers["box"].state is State.ASLEEP
            assert proxy.drivers["box"].held == 0
            assert 1 <= len(packets.packets) <= 0.6 / WOL_INTERVAL_S + 2
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("limit", ["node", "total"])
async def test_past_the_held_limit_new_clients_are_refused_at_once(tmp_path: Path,
                                                                   limit: str) -> None:
    backend_port = free_port()
    node, extra = ({"max_held": 2}, "") if limit == "node" else ({}, "[limits]\nmax_held_total = 2")
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            packets = await PacketListener.open()
            nursery.start_soon(packets.run)
            cfg = load_config(tmp_path, backend_port, packets.port, node=node, extra=extra)
            proxy: Proxy = await nursery.start(serve_proxy, cfg)
            port = proxy.route_address()[1]
            answers: list[bytes] = []

            async def client(i: int) -> None:
                answers.append(await request(port, f"held {i}\n".encode()))

            nursery.start_soon(client, 0)
            nursery.start_soon(client, 1)
            await wait_until(lambda: proxy.drivers["box"].held == 2)
            third = await trio.open_tcp_stream("127.0.0.1", port)
            with pytest.raises(trio.BrokenResourceError):
                await read_all(third)
            await third.aclose()
            route = proxy.cfg.routes[0].listen
            assert sample(proxy, "edge_connections_refused_total", node="box", route=route) == 1
            assert proxy.drivers["box"].held == 2  # the refused one never joined them
            await nursery.start(serve_backend, backend_port, answer_backend)
            await wait_until(lambda: len(answers) == 2)
            assert sorted(answers) == sorted(response_for(f"held {i}\n".encode()) for i in (0, 1))
            nursery.cancel_scope.cancel()


async def test_client_leaving_while_held_is_forgotten_and_the_wake_goes_on(
        tmp_path: Path) -> None:
    backend_port = free_port()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            packets = await PacketListener.open()
            nursery.start_soon(packets.run)
            proxy: Proxy = await nursery.start(serve_proxy,
                                               load_config(tmp_path, backend_port, packets.port))
            driver = proxy.drivers["box"]
            stream = await trio.open_tcp_stream("127.0.0.1", proxy.route_address()[1])
            await wait_until(lambda: driver.held == 1)
            await stream.aclose()
            await wait_until(lambda: driver.held == 0 and proxy.counts.open == 0)
            assert driver.state is State.WAKING  # the next client will find it awake sooner
            assert proxy.counts.held_total == 0
            await nursery.start(serve_backend, backend_port, answer_backend)
            await wait_until(lambda: driver.state is State.AWAKE)
            answer = await request(proxy.route_address()[1], b"after\n")
            assert answer == response_for(b"after\n")
            nursery.cancel_scope.cancel()


async def test_bytes_sent_while_held_beyond_the_buffer_arrive_in_order(tmp_path: Path) -> None:
    backend_port = free_port()
    payload = bytes(range(256)) * 20_000  # 5 MB, far past the 64 KiB hold buffer
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            packets = await PacketListener.open()
            nursery.start_soon(packets.run)
            cfg = load_config(tmp_path, backend_port, packets.port,
                              extra="[limits]\nhold_buffer_bytes = 65536")
            proxy: Proxy = await nursery.start(serve_proxy, cfg)
            stream = await trio.open_tcp_stream("127.0.0.1", proxy.route_address()[1])
            echoed: list[bytes] = []

            async def send() -> None:
                await stream.send_all(payload)
                await stream.send_eof()

            async def receive() -> None:
                echoed.append(await read_all(stream))

            async with trio.open_nursery() as io:
                io.start_soon(send)
                io.start_soon(receive)
                await packets.wait_for(2)
                assert proxy.drivers["box"].held == 1
                await io.start(serve_backend, backend_port, echo_backend)
                await wait_until(lambda: echoed)
                io.cancel_scope.cancel()
            await stream.aclose()
            assert echoed[0] == payload
            nursery.cancel_scope.cancel()


async def test_a_held_half_closed_request_is_delivered_with_its_eof(tmp_path: Path) -> None:
    backend_port = free_port()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            packets = await PacketListener.open()
            nursery.start_soon(packets.run)
            proxy: Proxy = await nursery.start(serve_proxy,
                                               load_config(tmp_path, backend_port, packets.port))
            stream = await trio.open_tcp_stream(*proxy.route_address())
            await stream.send_all(b"all of it")
            await stream.send_eof()  # the echo backend answers only after this EOF arrives
            await packets.wait_for(1)
            await wait_until(lambda: proxy.drivers["box"].held == 1)
            await nursery.start(serve_backend, backend_port, echo_backend)
            assert await read_all(stream) == b"all of it"
            await stream.aclose()
            nursery.cancel_scope.cancel()


async def test_after_a_failed_wake_clients_are_closed_at_once_until_the_cooldown_ends(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    backend_port = free_port()
    cooldown_s = 3.0
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            packets = await PacketListener.open()
            nursery.start_soon(packets.run)
            cfg = load_config(tmp_path, backend_port, packets.port,
                              node={"wake_timeout_s": 0.6, "wake_cooldown_s": cooldown_s})
            proxy: Proxy = await nursery.start(serve_proxy, cfg)
            port = proxy.route_address()[1]
            driver = proxy.drivers["box"]
            with pytest.raises(trio.BrokenResourceError):  # the first wake times out
                await request(port, b"first\n")
            failed_at, sent = trio.current_time(), len(packets.packets)
            assert sent >= 1 and driver.state is State.ASLEEP
            # the frontend's follow-ups inside the cooldown: closed at once, no second wake
            for _ in range(3):
                with pytest.raises(trio.BrokenResourceError):
                    await request(port, b"again\n")
            assert trio.current_time() - failed_at < cooldown_s  # all inside the cooldown
            assert len(packets.packets) == sent and driver.state is State.ASLEEP
            closed = [r.getMessage() for r in caplog.records if "not retrying" in r.getMessage()]
            assert len(closed) == 3
            # on loopback the port refuses (up, not ready); a sleeping host would not answer
            assert re.search(r"closing held connection: wake of box failed \d+ s ago \(not ready "
                             rf"within 0.6 s: connect to 127.0.0.1:{backend_port}: .*\); not "
                             r"retrying for another \d+ s$", closed[0]), closed[0]
            route = proxy.cfg.routes[0].listen
            assert sample(proxy, "edge_connections_timed_out_total", node="box", route=route) == 4
            assert sample(proxy, "edge_wake_failures_total", node="box") == 1
            assert sample(proxy, "edge_wakes_total", node="box", outcome="timeout") == 1
            # after it, a client starts a new wake (and the backend is back to answer it)
            await trio.sleep_until(failed_at + cooldown_s)
            await nursery.start(serve_backend, backend_port, answer_backend)
            answer = await request(port, b"later\n")
            assert answer == response_for(b"later\n")
            assert len(packets.packets) > sent
            assert sample(proxy, "edge_wakes_total", node="box", outcome="ready") == 1
            nursery.cancel_scope.cancel()
