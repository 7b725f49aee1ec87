"""TCP routes end to end on loopback: hold while the backend is down, wake, deliver; limits."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from edge_proxy.node import State
from edge_proxy.server import Proxy, serve_proxy
from edge_proxy.wol import PACKET_BYTES
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
            assert all(b - a >= WOL_INTERVAL_S * 0.9 for a, b in zip(times, times[1:], strict=False))
            assert proxy.drivers["box"].state is State.AWAKE
            assert sample(proxy, "edge_wakes_total", node="box", outcome="ready") == 1
            nursery.cancel_scope.cancel()
