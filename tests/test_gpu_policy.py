"""The pure P-state policy, stepped with explicit timestamps."""

from __future__ import annotations

import math

import pytest

from inference_node.gpu.policy import GpuActivity, PstatePolicy

LOW, HIGH = 8, 16


def policy(delay: float = 2.0) -> PstatePolicy:
    return PstatePolicy(low=LOW, high=HIGH, low_delay_s=delay)


def test_busy_is_high_at_once_and_low_only_after_the_delay() -> None:
    p = policy()
    d = p.decide({"g": True}, 10.0)
    assert d.wanted == {"g": HIGH} and d.activity["g"] is GpuActivity.BUSY and d.wake_at == math.inf
    d = p.decide({"g": False}, 11.0)
    assert d.wanted == {"g": HIGH} and d.activity["g"] is GpuActivity.COOLING and d.wake_at == 13.0
    assert p.decide({"g": False}, 12.999).wanted == {"g": HIGH}
    d = p.decide({"g": False}, 13.0)
    assert d.wanted == {"g": LOW} and d.activity["g"] is GpuActivity.IDLE and d.wake_at == math.inf


def test_back_to_back_requests_do_not_flap() -> None:
    p = policy()
    p.decide({"g": True}, 0.0)
    wanted = []
    for t, busy in [(1.0, False), (1.5, True), (2.0, False), (3.9, False), (3.95, True)]:
        wanted.append(p.decide({"g": busy}, t).wanted["g"])
    assert wanted == [HIGH] * 5
    assert p.decide({"g": False}, 4.0).wake_at == 6.0
    assert p.decide({"g": False}, 6.0).wanted["g"] == LOW


def test_gpus_are_independent_and_a_gpu_first_seen_idle_waits_the_delay() -> None:
    p = policy(1.0)
    d = p.decide({"a": True, "b": False}, 0.0)
    assert d.wanted == {"a": HIGH, "b": HIGH} and d.wake_at == 1.0
    d = p.decide({"a": True, "b": False}, 1.0)
    assert d.wanted == {"a": HIGH, "b": LOW}
    d = p.decide({"a": False}, 2.0)  # b is gone: forgotten
    assert d.wanted == {"a": HIGH} and d.wake_at == 3.0


def test_zero_delay_goes_low_in_the_same_step() -> None:
    p = policy(0.0)
    assert p.decide({"g": True}, 0.0).wanted["g"] == HIGH
    assert p.decide({"g": False}, 0.0).wanted["g"] == LOW


def test_negative_delay_is_refused() -> None:
    with pytest.raises(ValueError, match="low_delay_s"):
        PstatePolicy(low=LOW, high=HIGH, low_delay_s=-1)
