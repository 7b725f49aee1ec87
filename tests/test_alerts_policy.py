"""The alert policy (edge_proxy.alerts.policy) with explicit times, and the conversion of the
agent's observations into report records (inference_node.report.convert)."""

from __future__ import annotations

from dataclasses import dataclass, field

from edge_proxy.alerts.policy import AlertPolicy
from inference_node.report.convert import cycle_report, instance_change
from inference_node.supervisor.state import State
from shared.config.edge import AlertsConfig
from shared.reports import CycleReport, GpuReport, InstanceReport


def policy(**settings: object) -> AlertPolicy:
    return AlertPolicy(AlertsConfig(**settings))  # type: ignore[arg-type]


def gpu(t: float, temperature: float | None = 40.0, used: float | None = 1000.0) -> GpuReport:
    return GpuReport(1, t, "GPU-a", temperature_c=temperature, memory_used_mib=used,
                     memory_total_mib=24000.0)


def crash(t: float, name: str = "qwen") -> InstanceReport:
    return InstanceReport(1, t, name, "crashed", "BACKOFF", "exited with code 1")


def test_gpu_thresholds_raise_at_or_above_and_none_when_unset_or_unknown() -> None:
    p = policy(gpu_temp_c=85.0, gpu_memory_pct=90.0)
    assert p.report("box", gpu(0, temperature=84.9)) == []
    [hot] = p.report("box", gpu(1, temperature=85.0))
    assert (hot.kind, hot.key, hot.t) == ("gpu_temperature", "gpu_temperature:box:GPU-a", 1)
    assert "alerts.gpu_temp_c = 85" in hot.message
    [full] = p.report("box", gpu(2, used=21600.0))
    assert (full.kind, full.details["memory_pct"]) == ("gpu_memory", 90.0)
    assert p.report("box", gpu(3, temperature=None, used=None)) == []
    assert policy(gpu_temp_c=None).report("box", gpu(4, temperature=120.0)) == []


def test_a_crash_loop_is_n_crashes_of_one_instance_within_the_window() -> None:
    p = policy(crash_loop_count=3, crash_loop_window_s=60.0)
    assert p.report("box", crash(0)) == []
    assert p.report("box", crash(30)) == []
    assert p.report("box", crash(10, "other")) == []  # another instance counts apart
    [loop] = p.report("box", crash(59))
    assert (loop.key, loop.details["crashes"]) == ("crash_loop:box:qwen", 3)
    # 100 s on, the crashes at 0 and 30 are out of the window: two are not a loop.
    assert p.report("box", crash(100)) == []
    loaded = InstanceReport(1, 101, "qwen", "loaded", "READY")
    assert p.report("box", loaded) == []


def test_a_failed_suspend_alerts_and_a_veto_or_a_sleep_does_not() -> None:
    p = policy()
    failed = CycleReport(1, 5.0, "failed", "failed: suspend command exited 1: Access denied")
    [alert] = p.report("box", failed)
    assert (alert.kind, alert.key) == ("suspend_failed", "suspend_failed:box")
    assert "Access denied" in alert.message
    assert p.report("box", CycleReport(2, 6.0, "vetoed", "vetoed: proxy vetoed")) == []
    assert p.report("box", CycleReport(3, 7.0, "slept", "slept and resumed")) == []


def test_a_failed_wake_alerts_when_the_count_rises() -> None:
    p = policy()
    assert p.wake_failures("box", 0.0, 1.0) == []
    [alert] = p.wake_failures("box", 2.0, 2.0)
    assert (alert.kind, alert.key, alert.details) == ("wake_failed", "wake_failed:box",
                                                      {"failures_total": 2.0})
    assert p.wake_failures("box", 2.0, 3.0) == []


def test_a_key_goes_out_at_most_once_per_repeat_interval() -> None:
    p = policy(gpu_temp_c=80.0, alert_repeat_s=100.0)
    alerts = p.report("box", gpu(0, temperature=90.0))
    assert p.admit(alerts, now=1000.0) == alerts
    assert p.admit(p.report("box", gpu(1, temperature=91.0)), now=1099.9) == []
    other = p.report("box2", gpu(1, temperature=91.0))  # another node's key is its own
    assert p.admit(other, now=1099.9) == other
    again = p.report("box", gpu(2, temperature=92.0))
    assert p.admit(again, now=1100.0) == again


def test_instance_changes_worth_reporting() -> None:
    assert instance_change(State.STARTING, State.READY) == "loaded"
    assert instance_change(State.STOPPING, State.STOPPED) == "unloaded"
    assert instance_change(State.READY, State.BACKOFF) == "crashed"
    assert instance_change(State.READY, State.FAILED) == "crashed"
    assert instance_change(State.STOPPED, State.STARTING) is None
    assert instance_change(State.READY, State.STOPPING) is None
    assert instance_change(State.BACKOFF, State.STOPPED) is None


@dataclass
class Cycle:
    started: float
    outcome: str
    steps: list[tuple[str, float]] = field(default_factory=list)


def test_a_cycle_is_reported_once_ended_with_its_phase_times() -> None:
    steps = [("asking the proxy", 100.1), ("stopping instances", 100.2),
             ("suspend command", 100.5), ("resume seen (sleep hook: post)", 102.5),
             ("starting instances", 102.6), ("resumed sent", 102.7), ("a READY", 104.0),
             ("b READY", 106.6)]
    assert cycle_report(Cycle(100.0, "running", steps), t=5.0) is None
    report = cycle_report(Cycle(100.0, "slept and resumed", steps), t=5.0)
    assert report is not None
    assert (report.outcome, report.t) == ("slept", 5.0)
    assert report.steps[0] == ("asking the proxy", 0.1)
    assert (report.idle_to_suspend_s, report.suspend_to_resume_s) == (0.5, 2.0)
    assert report.resume_to_ready_s == 4.1
    failed = cycle_report(Cycle(0.0, "failed: exited 1", [("suspend command", 0.3)]), t=1.0)
    assert failed is not None and failed.outcome == "failed"
    assert (failed.suspend_to_resume_s, failed.resume_to_ready_s) == (None, None)
    # A sleep the agent did not start: no suspend step; ready counts from the restart.
    unasked = cycle_report(Cycle(0.0, "slept and resumed",
                                 [("starting instances", 0.2), ("a READY", 1.2)]), t=1.0)
    assert unasked is not None and unasked.resume_to_ready_s == 1.0
    vetoed = cycle_report(Cycle(0.0, "vetoed: proxy vetoed: 1 open"), t=1.0)
    assert vetoed is not None and vetoed.outcome == "vetoed"
