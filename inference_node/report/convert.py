"""The agent's observations as report records: pure functions, no I/O.

Records are made with ``seq = 0``; the buffer numbers them. ``t`` is wall time (Unix
seconds), passed in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from inference_node.gpu.inventory import GpuInfo
from inference_node.supervisor.state import State
from shared.reports import CycleOutcome, CycleReport, GpuReport, InstanceChange, InstanceReport

# The power manager's step names (inference_node.power.manager) that mark the cycle's phases.
SUSPEND_STEP = "suspend command"
RESUME_STEP_PREFIX = "resume seen"
UNASKED_RESUME_STEP = "starting instances"  # a sleep the agent did not start has no "resume seen"
READY_STEP_SUFFIX = " READY"
RUNNING_OUTCOME = "running"
SLEPT_OUTCOME = "slept and resumed"


class CycleLike(Protocol):
    """What is read of the power manager's ``CycleRecord``."""

    @property
    def started(self) -> float: ...

    @property
    def outcome(self) -> str: ...

    @property
    def steps(self) -> list[tuple[str, float]]: ...


def gpu_reports(gpus: Sequence[GpuInfo], wanted: Mapping[str, int | None],
                t: float) -> list[GpuReport]:
    """One record per GPU: NVML's readings (its P-state is the read-back) and the P-state
    the controller wants for it."""
    return [GpuReport(0, t, g.uuid, utilization_pct=_f(g.utilization_pct),
                      memory_used_mib=g.memory_used_mib, memory_total_mib=g.memory_total_mib,
                      temperature_c=_f(g.temperature_c), power_w=g.power_w,
                      pstate_wanted=wanted.get(g.uuid), pstate_read=g.pstate)
            for g in gpus]


def instance_change(old: State, new: State) -> InstanceChange | None:
    """``loaded`` (READY), ``unloaded`` (stopped after running) or ``crashed`` (exited
    unasked: BACKOFF, or FAILED); None for the steps between."""
    if new is State.READY:
        return "loaded"
    if new in (State.BACKOFF, State.FAILED):
        return "crashed"
    if new is State.STOPPED and old in (State.STARTING, State.READY, State.STOPPING):
        return "unloaded"
    return None


def instance_report(name: str, old: State, new: State, reason: str,
                    t: float) -> InstanceReport | None:
    """The record of a state change worth reporting, or None."""
    change = instance_change(old, new)
    if change is None:
        return None
    return InstanceReport(0, t, name, change, new.name, reason[:500])


def cycle_outcome(outcome: str) -> CycleOutcome | None:
    """The wire outcome of a finished cycle; None while it runs."""
    if outcome == RUNNING_OUTCOME:
        return None
    if outcome == SLEPT_OUTCOME:
        return "slept"
    return "failed" if outcome.startswith("failed") else "vetoed"


def cycle_report(record: CycleLike, t: float) -> CycleReport | None:
    """The record of a finished cycle (None while it runs), with its phase durations:
    idle → suspend command → resume seen → the last instance READY."""
    outcome = cycle_outcome(record.outcome)
    if outcome is None:
        return None
    steps = tuple((name, round(max(0.0, at - record.started), 3)) for name, at in record.steps)
    suspend = _first(steps, lambda n: n == SUSPEND_STEP)
    resume = _first(steps, lambda n: n.startswith(RESUME_STEP_PREFIX))
    if resume is None and suspend is None:
        resume = _first(steps, lambda n: n == UNASKED_RESUME_STEP)
    ready = [at for name, at in steps if name.endswith(READY_STEP_SUFFIX)
             and resume is not None and at >= resume]
    return CycleReport(
        0, t, outcome, record.outcome[:500], steps[:50],
        idle_to_suspend_s=suspend,
        suspend_to_resume_s=None if suspend is None or resume is None
        else round(resume - suspend, 3),
        resume_to_ready_s=None if resume is None or not ready else round(ready[-1] - resume, 3))


def _first(steps: Sequence[tuple[str, float]], match: Callable[[str], bool]) -> float | None:
    for name, at in steps:
        if match(name):
            return at
    return None


def _f(value: int | None) -> float | None:
    return None if value is None else float(value)
