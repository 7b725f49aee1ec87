"""Busy/idle per instance, from log events, corrected by ``GET /slots``.

``BusyTracker.feed(instance, line, t)`` is a line sink: the supervisor calls it with every
stdout/stderr line of every instance and the trio time the line was read. An instance is busy
while at least one of its slots holds a task. Listeners (``add_listener``) are called
synchronously on every busy/idle edge, in the same call that fed the line, so a P-state switch
can start before llama-server evaluates the prompt.

Drift (a missed line, a child that restarted mid-task) is corrected by ``reconcile`` with what
``/slots`` reports; each correction is logged and counted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from inference_node.activity.parser import (
    AllIdle,
    BufferSize,
    Event,
    ModelLoaded,
    TaskFinished,
    TaskStarted,
    parse_line,
)

log = logging.getLogger(__name__)

# The task id of a slot that /slots reported busy before its log line arrived: the line, when
# it comes, still counts the task.
UNKNOWN_TASK = -1

BusyListener = Callable[[str, bool, float], None]
"""``listener(instance, busy, t)``, called on each busy/idle edge."""


@dataclass
class InstanceActivity:
    """What the logs (and /slots) say about one instance."""

    name: str
    active: dict[int, int] = field(default_factory=dict)  # slot -> task
    busy_since: float | None = None
    last_change: float | None = None
    busy_seconds: float = 0.0
    tasks_started: int = 0
    tasks_finished: int = 0
    corrections: int = 0
    model_loaded: bool = False
    buffers: dict[tuple[str, str], float] = field(default_factory=dict)  # (kind, device) -> MiB
    seq: int = 0  # bumped on every event; reconcile skips answers older than the last event
    tokens_per_second: float | None = None  # from /metrics, when the instance exposes it
    requests_processing: int | None = None
    tokens_predicted: int | None = None

    @property
    def busy(self) -> bool:
        return bool(self.active)

    def busy_total(self, now: float) -> float:
        """Seconds busy so far, counting the current busy stretch up to ``now``."""
        extra = now - self.busy_since if self.busy_since is not None else 0.0
        return self.busy_seconds + max(0.0, extra)

    def status(self, now: float) -> dict[str, Any]:
        return {
            "busy": self.busy,
            "active_slots": {str(s): t for s, t in sorted(self.active.items())},
            "busy_seconds": round(self.busy_total(now), 3),
            "tasks_started": self.tasks_started,
            "tasks_finished": self.tasks_finished,
            "corrections": self.corrections,
            "model_loaded": self.model_loaded,
            "buffers_mib": {f"{k}:{d}": v for (k, d), v in sorted(self.buffers.items())},
            "tokens_per_second": self.tokens_per_second,
            "requests_processing": self.requests_processing,
            "tokens_predicted": self.tokens_predicted,
        }

    def __repr__(self) -> str:
        state = f"busy slots={sorted(self.active)}" if self.active else "idle"
        return f"<InstanceActivity {self.name} {state} tasks={self.tasks_started}>"


class BusyTracker:
    """Busy/idle state of every instance, fed by log lines and corrected by /slots."""

    def __init__(self) -> None:
        self._instances: dict[str, InstanceActivity] = {}
        self._listeners: list[BusyListener] = []

    def __repr__(self) -> str:
        return f"<BusyTracker {len(self._instances)} instance(s), busy: {self.busy_instances()}>"

    def add_listener(self, listener: BusyListener) -> None:
        """Call ``listener(instance, busy, t)`` on every busy/idle edge (synchronously)."""
        self._listeners.append(listener)

    def instance(self, name: str) -> InstanceActivity:
        """The activity record of ``name``, created idle on first use."""
        record = self._instances.get(name)
        if record is None:
            record = self._instances[name] = InstanceActivity(name)
        return record

    def busy(self, name: str) -> bool:
        record = self._instances.get(name)
        return record is not None and record.busy

    def busy_instances(self) -> list[str]:
        return sorted(name for name, r in self._instances.items() if r.busy)

    def names(self) -> list[str]:
        return sorted(self._instances)

    def feed(self, instance: str, line: str, t: float) -> None:
        """Line sink: parse one log line of ``instance`` read at time ``t``; never raises."""
        event = parse_line(line)
        if event is not None:
            self.apply(instance, event, t)

    def apply(self, instance: str, event: Event, t: float) -> None:
        """Update ``instance`` with one event seen at time ``t``."""
        record = self.instance(instance)
        was_busy = record.busy
        record.seq += 1
        match event:
            case TaskStarted(slot, task):
                previous = record.active.get(slot)
                if previous is not None and previous not in (task, UNKNOWN_TASK):
                    log.info("%s: slot %d started task %d without releasing task %d",
                             instance, slot, task, previous)
                if previous != task:
                    record.tasks_started += 1
                record.active[slot] = task
            case TaskFinished(slot, task):
                if record.active.pop(slot, None) is not None:
                    record.tasks_finished += 1
            case AllIdle():
                if record.active:
                    log.info("%s: all slots idle while %s looked busy; a release line was missed",
                             instance, _slots_text(record.active))
                    record.tasks_finished += len(record.active)
                    record.active.clear()
            case ModelLoaded():
                record.model_loaded = True
                record.active.clear()  # a freshly loaded server runs nothing
            case BufferSize(kind, device, mib):
                record.buffers[(kind, device)] = mib
        self._edge(record, was_busy, t, "log")

    def reconcile(self, instance: str, processing: Mapping[int, int], seq: int, t: float) -> str | None:
        """Correct ``instance`` with ``/slots``: ``processing`` maps each busy slot to its task.

        ``seq`` is the record's ``seq`` when the request was sent; if a log event arrived since,
        the logs are newer than the answer and nothing changes. Returns the correction made
        (a readable reason, also logged) or None when logs and /slots agree.
        """
        record = self.instance(instance)
        # Compare slots, not task ids: a task id in /slots may lag a line behind the log.
        if record.seq != seq or set(processing) == set(record.active):
            return None
        reason = (f"{instance}: /slots says {_slots_text(processing)} but the log said "
                  f"{_slots_text(record.active)}; following /slots")
        log.warning("%s", reason)
        was_busy = record.busy
        record.corrections += 1
        record.seq += 1
        # Tasks /slots no longer shows ended; their release lines, if late, count nothing twice.
        record.tasks_finished += len(set(record.active) - set(processing))
        record.active = {slot: record.active.get(slot, UNKNOWN_TASK) for slot in processing}
        self._edge(record, was_busy, t, "slots")
        return reason

    def reset(self, instance: str, t: float) -> None:
        """The instance stopped or restarted: nothing runs on it any more."""
        record = self.instance(instance)
        was_busy = record.busy
        record.seq += 1
        record.active.clear()
        record.model_loaded = False
        self._edge(record, was_busy, t, "reset")

    def status(self, now: float) -> dict[str, dict[str, Any]]:
        """JSON-ready activity of every instance."""
        return {name: r.status(now) for name, r in sorted(self._instances.items())}

    def _edge(self, record: InstanceActivity, was_busy: bool, t: float, source: str) -> None:
        busy = record.busy
        if busy == was_busy:
            return
        if busy:
            record.busy_since = t
        elif record.busy_since is not None:
            record.busy_seconds += max(0.0, t - record.busy_since)
            record.busy_since = None
        record.last_change = t
        log.debug("%s: %s -> %s (%s)", record.name, "busy" if was_busy else "idle",
                  "busy" if busy else "idle", source)
        for listener in self._listeners:
            try:
                listener(record.name, busy, t)
            except Exception:  # one broken listener must not stop the others or the log reader
                log.exception("busy listener %r failed", listener)


def _slots_text(active: Mapping[int, int]) -> str:
    if not active:
        return "no slot processing"
    return ", ".join(f"slot {s} task {t}" for s, t in sorted(active.items()))
