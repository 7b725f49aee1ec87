"""The idle policy and the power state machine, stepped with explicit timestamps."""

from __future__ import annotations

import pytest

from inference_node.errors import IllegalPowerTransition
from inference_node.power.policy import IdlePolicy, PowerEvent, PowerMachine, PowerState
from inference_node.power.resume import MIN_SLEEP_GAP_S, GapDetector


def test_suspends_only_after_a_full_idle_timeout() -> None:
    p = IdlePolicy(idle_timeout_s=60, min_awake_s=0, now=0)
    assert not p.observe(10, []).suspend
    v = p.observe(69.9, [])
    assert not v.suspend and v.sleep_at == 70
    assert p.observe(70, []).suspend


def test_activity_restarts_the_idle_period_and_reports_reasons() -> None:
    p = IdlePolicy(idle_timeout_s=60, min_awake_s=0, now=0)
    p.observe(0, [])
    v = p.observe(50, ["busy instance: qwen (1 task)"])
    assert v.reasons == ("busy instance: qwen (1 task)",) and v.sleep_at is None
    assert "qwen" in v.describe(50)
    assert not p.observe(100, []).suspend  # idle again since 100
    assert p.observe(160, []).suspend


def test_min_awake_after_resume_wins_over_a_short_idle_timeout() -> None:
    p = IdlePolicy(idle_timeout_s=10, min_awake_s=120, now=0)
    assert p.observe(0, []).sleep_at == 120
    assert not p.observe(119, []).suspend
    assert p.observe(120, []).suspend
    p.resumed(1000)
    assert p.observe(1000, []).sleep_at == 1120


def test_veto_resets_the_timer_and_failure_backs_off() -> None:
    p = IdlePolicy(idle_timeout_s=10, min_awake_s=0, now=0)
    p.observe(0, [])
    assert p.observe(10, []).suspend
    p.vetoed(10)
    assert p.observe(11, []).sleep_at == 21
    p.failed(30, backoff_s=300)
    assert p.observe(31, []).sleep_at == 330
    assert "330" not in p.observe(32, []).describe(32)  # describe says "in N s", not a timestamp
    assert p.observe(32, []).describe(32) == "idle: suspend in 298 s"


def test_power_machine_full_cycle_and_illegal_moves() -> None:
    m = PowerMachine(now=0)
    for event, state in [
        (PowerEvent.IDLE, PowerState.SUSPENDING),
        (PowerEvent.SUSPEND_ISSUED, PowerState.SLEEPING),
        (PowerEvent.RESUME, PowerState.RESUMING),
        (PowerEvent.READY, PowerState.AWAKE),
        (PowerEvent.IDLE, PowerState.SUSPENDING),
        (PowerEvent.VETO, PowerState.AWAKE),
        (PowerEvent.IDLE, PowerState.SUSPENDING),
        (PowerEvent.SUSPEND_FAILED, PowerState.FAILED),
        (PowerEvent.RETRY, PowerState.AWAKE),
    ]:
        assert m.apply(event, 1, "test") is state
    with pytest.raises(IllegalPowerTransition, match="READY is not allowed in state AWAKE"):
        m.apply(PowerEvent.READY, 2, "test")
    assert "AWAKE" in repr(m)


def test_gap_detector_sees_sleeps_and_ignores_noise() -> None:
    d = GapDetector(last_gap=5.0)
    assert d.feed(5.01) is None
    assert d.feed(5.01 + MIN_SLEEP_GAP_S + 40) == pytest.approx(MIN_SLEEP_GAP_S + 40)
    assert d.feed(5.01 + MIN_SLEEP_GAP_S + 40) is None
