"""The admit/hold/connect step every route goes through, on a virtual clock: a real
``NodeDriver`` probing real loopback ports, real connects; only the NIC is replaced, by a
sender that records instead of broadcasting."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import trio
import trio.testing

from edge_proxy.admission import (
    MAX_CONNECT_ATTEMPTS,
    Admission,
    Connected,
    ConnectionCounts,
    GaveUp,
    Hold,
    LeftWhileHeld,
    NotWoken,
    Outcome,
    Refused,
    WhileHeld,
)
from edge_proxy.metrics import ProxyMetrics
from edge_proxy.probe import connect
from edge_proxy.wake.driver import Backend, NodeDriver
from edge_proxy.wake.machine import State
from shared.config.edge import LimitsConfig, NodeConfig, WolConfig
from tests.support.edge import echo_backend, free_port, serve_backend
from tests.test_edge_wake_driver import RecordingSender

WOL_INTERVAL_S = 2.0
WAKE_TIMEOUT_S = 30.0
PROBE_INTERVAL_S = 1.0
WOKEN_AFTER_S = 5.0  # when the tests' backends start listening


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def node_config(max_held: int = 100) -> NodeConfig:
    return NodeConfig(host="127.0.0.1", mac="aa:bb:cc:dd:ee:01",
                      wol=WolConfig(broadcast="127.0.0.1"), wol_interval_s=WOL_INTERVAL_S,
                      wake_timeout_s=WAKE_TIMEOUT_S, probe_interval_s=PROBE_INTERVAL_S,
                      probe_timeout_s=0.5, max_held=max_held)


class Node:
    """A driver for one node whose backend is ``port`` on loopback, and what it sent."""

    def __init__(self, port: int, *, max_held: int = 100, max_held_total: int = 100) -> None:
        self.port = port
        self.sender = RecordingSender()
        self.driver = NodeDriver("box", node_config(max_held), ProxyMetrics(), self.sender)
        self.driver.backends = {Backend(port, None)}
        self.counts = ConnectionCounts(LimitsConfig(max_held_total=max_held_total))
        self.connects = 0
        self.holds = 0

    async def start(self, nursery: trio.Nursery) -> None:
        await nursery.start(self.driver.run)
        while self.driver.state is State.UNKNOWN:
            await trio.sleep(0.01)

    async def connect(self, port: int | None = None) -> trio.SocketStream:
        self.connects += 1
        return await connect("127.0.0.1", port or self.port, 0.5)

    @contextmanager
    def holding(self) -> Iterator[None]:
        self.holds += 1
        yield

    async def admit(self, port: int | None = None,
                    while_held: WhileHeld | None = None) -> Outcome[trio.SocketStream]:
        admission = Admission(self.driver, self.port, self.counts, "127.0.0.1:0")
        return await admission.connect(lambda: self.connect(port), holding=self.holding,
                                       while_held=while_held)


async def _echo_once(stream: trio.SocketStream) -> bytes:
    async with stream:
        await stream.send_all(b"ping\n")
        return await stream.receive_some(64)


async def test_held_until_the_node_wakes_then_connected(
        autojump_clock: trio.testing.MockClock) -> None:
    node = Node(free_port())
    SEND_AT_S, SEND_S = 4.0, 3.0  # a send that the release (at 5 s) comes in the middle of
    seen: list[tuple[str, float, bool]] = []

    async def while_held(hold: Hold) -> str | None:
        seen.append(("start", trio.current_time() - start, hold.released))
        await trio.sleep(SEND_AT_S)
        with hold.uninterrupted():
            await trio.sleep(SEND_S)
            seen.append(("sent", trio.current_time() - start, hold.released))
        try:
            await trio.sleep_forever()
        finally:
            seen.append(("stopped", trio.current_time() - start, hold.released))

    async with trio.open_nursery() as nursery:
        await node.start(nursery)
        assert node.driver.state is State.ASLEEP
        start = trio.current_time()
        outcomes: list[tuple[float, Outcome[trio.SocketStream]]] = []

        async def client() -> None:
            outcome = await node.admit(while_held=while_held)
            outcomes.append((trio.current_time() - start, outcome))

        nursery.start_soon(client)
        await trio.sleep(WOKEN_AFTER_S - 0.5)
        assert node.driver.state is State.WAKING and not outcomes
        assert node.driver.held == 1 and node.counts.held_total == 1
        await nursery.start(serve_backend, node.port, echo_backend)
        while not outcomes:
            await trio.sleep(0.01)
        assert node.driver.state is State.AWAKE
        connected_at, outcome = outcomes[0]
        assert isinstance(outcome, Connected)
        assert await _echo_once(outcome.value) == b"ping\n"
        nursery.cancel_scope.cancel()
    assert [round(t - start, 6) for t, _ in node.sender.sent] == [0.0, 2.0, 4.0]
    # released at the probe after the backend came (5 s), during the send: the send finished,
    # then the hook was stopped and the connect went out
    assert seen == [("start", 0.0, False), ("sent", SEND_AT_S + SEND_S, True),
                    ("stopped", SEND_AT_S + SEND_S, True)]
    assert connected_at == SEND_AT_S + SEND_S
    assert node.holds == 1 and node.connects == 1
    assert node.driver.held == 0 and node.counts.held_total == 0


async def test_a_failed_wake_is_an_outcome_with_its_reason(
        autojump_clock: trio.testing.MockClock) -> None:
    node = Node(free_port())  # nothing ever listens
    async with trio.open_nursery() as nursery:
        await node.start(nursery)
        start = trio.current_time()
        outcome = await node.admit()
        assert trio.current_time() - start == WAKE_TIMEOUT_S
        nursery.cancel_scope.cancel()
    assert outcome == NotWoken("wake timed out after 30 s")
    assert node.connects == 0 and node.holds == 1
    assert node.driver.held == 0 and node.counts.held_total == 0


async def test_a_connect_refused_while_awake_starts_a_wake_and_is_retried(
        autojump_clock: trio.testing.MockClock) -> None:
    node = Node(free_port())
    async with trio.open_nursery() as nursery:
        backend = trio.CancelScope()

        async def serve(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                        ) -> None:
            with backend:
                await serve_backend(node.port, echo_backend, task_status=task_status)

        await nursery.start(serve)
        await node.start(nursery)
        assert node.driver.state is State.AWAKE
        backend.cancel()  # the backend goes away; no probe runs while AWAKE to notice
        await trio.sleep(0.01)
        outcomes: list[Outcome[trio.SocketStream]] = []

        async def client() -> None:
            outcomes.append(await node.admit())

        start = trio.current_time()
        nursery.start_soon(client)
        await trio.sleep(WOKEN_AFTER_S - 0.5)
        assert node.driver.state is State.WAKING and node.driver.held == 1 and not outcomes
        await nursery.start(serve_backend, node.port, echo_backend)
        while not outcomes:
            await trio.sleep(0.01)
        outcome = outcomes[0]
        assert isinstance(outcome, Connected)
        assert await _echo_once(outcome.value) == b"ping\n"
        nursery.cancel_scope.cancel()
    assert node.connects == 2 and node.holds == 1
    # the refusal started a wake at once: packets at 0, 2 and 4 s, ready at the next probe
    assert [round(t - start, 6) for t, _ in node.sender.sent] == [0.0, 2.0, 4.0]
    assert node.driver.machine.last_wake is not None
    assert node.driver.machine.last_wake.outcome == "ready"


@pytest.mark.parametrize("limit", ["node", "total"])
async def test_past_the_held_limit_a_connection_is_refused_at_once(
        autojump_clock: trio.testing.MockClock, limit: str) -> None:
    node = Node(free_port(), **{"max_held" if limit == "node" else "max_held_total": 1})
    async with trio.open_nursery() as nursery:
        await node.start(nursery)
        first: list[Outcome[trio.SocketStream]] = []

        async def client() -> None:
            first.append(await node.admit())

        nursery.start_soon(client)
        while node.driver.held != 1:
            await trio.sleep(0.01)
        start = trio.current_time()
        second = await node.admit()
        assert trio.current_time() == start
        assert second == Refused("held limit reached (1 for node box, 1 overall)")
        assert node.driver.held == 1 and node.counts.held_total == 1 and not first
        nursery.cancel_scope.cancel()
    assert node.connects == 0 and node.holds == 1


async def test_a_client_leaving_while_held_ends_its_hold_and_the_wake_goes_on(
        autojump_clock: trio.testing.MockClock) -> None:
    node = Node(free_port())

    async def leaves(hold: Hold) -> str | None:
        await trio.sleep(WOL_INTERVAL_S + 0.5)
        return "client closed before sending anything"

    async with trio.open_nursery() as nursery:
        await node.start(nursery)
        outcome = await node.admit(while_held=leaves)
        assert outcome == LeftWhileHeld("client closed before sending anything")
        assert node.driver.held == 0 and node.counts.held_total == 0
        assert node.driver.state is State.WAKING  # the next client finds it awake sooner
        await nursery.start(serve_backend, node.port, echo_backend)
        await trio.sleep(PROBE_INTERVAL_S * 2)
        assert node.driver.state is State.AWAKE
        nursery.cancel_scope.cancel()
    assert node.connects == 0 and node.holds == 1


async def test_a_backend_that_keeps_refusing_is_given_up_on(
        autojump_clock: trio.testing.MockClock) -> None:
    node = Node(free_port())
    refusing = free_port()  # the route's port: nothing listens there, while probes pass
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_backend, node.port, echo_backend)
        await node.start(nursery)
        outcome = await node.admit(port=refusing)
        nursery.cancel_scope.cancel()
    assert outcome == GaveUp(MAX_CONNECT_ATTEMPTS)
    # each refusal started a wake that the probes ended at once; the last one is not waited for
    assert node.connects == MAX_CONNECT_ATTEMPTS and node.holds == MAX_CONNECT_ATTEMPTS - 1
    assert node.driver.held == 0 and node.counts.held_total == 0
