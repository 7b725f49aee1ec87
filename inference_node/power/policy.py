"""When to suspend: pure decisions from check results and ``now``; no I/O, no clocks.

The node may sleep once every check has said "idle" for ``idle_timeout_s`` without a break, and
not before ``min_awake_s`` after boot or resume. A vetoed or failed suspend resets the idle timer
(a veto) or pushes the next try out by a backoff (a failure).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from inference_node.errors import IllegalPowerTransition

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verdict:
    """What the policy says right now, and why, in words a person can read."""

    suspend: bool
    reasons: tuple[str, ...]  # what keeps the node awake; empty when idle
    sleep_at: float | None  # when it would suspend if nothing changes; None while active

    def describe(self, now: float) -> str:
        if self.suspend:
            return "idle: suspending now"
        if self.reasons:
            return "awake: " + "; ".join(self.reasons)
        assert self.sleep_at is not None
        return f"idle: suspend in {max(0.0, self.sleep_at - now):.0f} s"


class IdlePolicy:
    """Counts idle time from check results. Feed it ``observe(now, reasons)`` periodically."""

    def __init__(self, idle_timeout_s: float, min_awake_s: float, now: float) -> None:
        self.idle_timeout_s = idle_timeout_s
        self.min_awake_s = min_awake_s
        self.awake_since = now
        self.idle_since: float | None = None
        self.not_before = now + min_awake_s

    def reconfigure(self, idle_timeout_s: float, min_awake_s: float) -> None:
        """New timeouts (a config reload), used from the next observation; a ``min_awake_s``
        already counting keeps the end it had."""
        self.idle_timeout_s = idle_timeout_s
        self.min_awake_s = min_awake_s

    def observe(self, now: float, reasons: Sequence[str]) -> Verdict:
        """Record one round of checks; ``reasons`` lists every check that said active."""
        if reasons:
            self.idle_since = None
            return Verdict(False, tuple(reasons), None)
        if self.idle_since is None:
            self.idle_since = now
        sleep_at = max(self.idle_since + self.idle_timeout_s, self.not_before)
        return Verdict(now >= sleep_at, (), sleep_at)

    def resumed(self, now: float) -> None:
        """The machine came back: start counting from zero, and stay up ``min_awake_s``."""
        self.awake_since = now
        self.idle_since = None
        self.not_before = now + self.min_awake_s

    def vetoed(self, now: float) -> None:
        """The proxy said no (clients in flight): the idle period starts again."""
        self.idle_since = None

    def failed(self, now: float, backoff_s: float) -> None:
        """A suspend attempt failed: do not try again before ``backoff_s`` from now."""
        self.idle_since = None
        self.not_before = max(self.not_before, now + backoff_s)


class PowerState(enum.Enum):
    """The agent's view of the machine's power."""

    AWAKE = "awake"
    SUSPENDING = "suspending"  # asking the proxy, stopping instances, releasing P-states
    SLEEPING = "sleeping"  # the suspend command ran; waiting to see the resume
    RESUMING = "resuming"  # starting instances again, telling the proxy
    FAILED = "failed"  # the last suspend failed; instances restarted, backing off


class PowerEvent(enum.Enum):
    IDLE = "idle timeout reached"
    VETO = "proxy vetoed"
    SUSPEND_ISSUED = "suspend command ran"
    SUSPEND_FAILED = "suspend failed"
    RESUME = "resume detected"
    READY = "instances started"
    RETRY = "backoff over"


_TRANSITIONS: dict[tuple[PowerState, PowerEvent], PowerState] = {
    (PowerState.AWAKE, PowerEvent.IDLE): PowerState.SUSPENDING,
    (PowerState.FAILED, PowerEvent.IDLE): PowerState.SUSPENDING,
    (PowerState.SUSPENDING, PowerEvent.VETO): PowerState.AWAKE,
    (PowerState.SUSPENDING, PowerEvent.SUSPEND_ISSUED): PowerState.SLEEPING,
    (PowerState.SUSPENDING, PowerEvent.SUSPEND_FAILED): PowerState.FAILED,
    (PowerState.SLEEPING, PowerEvent.SUSPEND_FAILED): PowerState.FAILED,
    (PowerState.SLEEPING, PowerEvent.RESUME): PowerState.RESUMING,
    (PowerState.RESUMING, PowerEvent.READY): PowerState.AWAKE,
    (PowerState.FAILED, PowerEvent.RETRY): PowerState.AWAKE,
    # A resume seen while awake (someone ran `systemctl suspend` by hand) restarts cleanly.
    (PowerState.AWAKE, PowerEvent.RESUME): PowerState.RESUMING,
    (PowerState.FAILED, PowerEvent.RESUME): PowerState.RESUMING,
}


class PowerMachine:
    """The one power state machine of the node; every move is logged with its reason."""

    def __init__(self, now: float) -> None:
        self.state = PowerState.AWAKE
        self.since = now
        self.last_reason = "started"

    def apply(self, event: PowerEvent, now: float, reason: str) -> PowerState:
        new = _TRANSITIONS.get((self.state, event))
        if new is None:
            raise IllegalPowerTransition(self.state, event)
        log.info("power: %s -> %s (%s)", self.state.name, new.name, reason)
        self.state, self.since, self.last_reason = new, now, reason
        return new

    def can(self, event: PowerEvent) -> bool:
        return (self.state, event) in _TRANSITIONS

    def __repr__(self) -> str:
        return f"<PowerMachine {self.state.name} since={self.since:.1f} ({self.last_reason})>"
