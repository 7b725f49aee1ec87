"""The trio driver of a node's wake machine on a virtual clock: exact packet times, one wake
for many waiters, a timeout at exactly wake_timeout_s. The backend is a real loopback port
that refuses; only the NIC is replaced, by a sender that records instead of broadcasting."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import trio
import trio.testing

from edge_proxy.errors import WakeFailed
from edge_proxy.metrics import ProxyMetrics
from edge_proxy.wake.driver import Backend, NodeDriver
from edge_proxy.wake.machine import State
from shared.config.edge import NodeConfig, WolConfig
from tests.support.edge import free_port

WOL_INTERVAL_S = 2.0
WAKE_TIMEOUT_S = 30.0


@dataclass
class RecordingSender:
    """Stands in for the NIC: remembers each packet and when it was sent."""

    sent: list[tuple[float, bytes]] = field(default_factory=list)

    async def send(self, packet: bytes, wol: WolConfig) -> None:
        self.sent.append((trio.current_time(), packet))


def node_config() -> NodeConfig:
    return NodeConfig(host="127.0.0.1", mac="aa:bb:cc:dd:ee:01",
                      wol=WolConfig(broadcast="127.0.0.1"), wol_interval_s=WOL_INTERVAL_S,
                      wake_timeout_s=WAKE_TIMEOUT_S, probe_interval_s=1.0, probe_timeout_s=0.5)


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def test_one_wake_for_many_waiters_times_out_on_schedule(
        autojump_clock: trio.testing.MockClock) -> None:
    sender = RecordingSender()
    driver = NodeDriver("box", node_config(), ProxyMetrics(), sender)
    driver.backends = {Backend(free_port(), None)}  # nothing listens: refused
    failures: list[float] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.run)
        while driver.state is State.UNKNOWN:
            await trio.sleep(0.01)
        assert driver.state is State.ASLEEP
        start = trio.current_time()

        async def waiter() -> None:
            with pytest.raises(WakeFailed, match="wake timed out after 30 s"):
                await driver.wait_awake()
            failures.append(trio.current_time() - start)

        async with trio.open_nursery() as waiters:
            for _ in range(50):
                waiters.start_soon(waiter)
        nursery.cancel_scope.cancel()
    assert failures == [WAKE_TIMEOUT_S] * 50
    times = [round(t - start, 6) for t, _ in sender.sent]
    assert times == [WOL_INTERVAL_S * i for i in range(15)]  # 0, 2, ..., 28: one wake
    assert driver.state is State.ASLEEP
    assert driver.machine.last_wake is not None
    assert driver.machine.last_wake.outcome == "timeout"


async def test_agent_ready_releases_waiters_at_once(autojump_clock: trio.testing.MockClock) -> None:
    driver = NodeDriver("box", node_config(), ProxyMetrics(), RecordingSender())
    driver.backends = {Backend(free_port(), None)}
    released: list[float] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.run)

        async def waiter() -> None:
            await driver.wait_awake()
            released.append(trio.current_time())

        nursery.start_soon(waiter)
        await trio.sleep(5)
        assert driver.state is State.WAKING and not released
        ready_at = trio.current_time()
        driver.agent_event("ready", "instances started")
        await trio.sleep(0)
        await trio.sleep(0)
        assert released == [ready_at]
        assert driver.state is State.AWAKE
        nursery.cancel_scope.cancel()
