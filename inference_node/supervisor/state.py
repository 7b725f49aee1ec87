"""Instance states, the legal moves between them, and the pure restart policy.

The state machine is a table (``TRANSITIONS``); ``check_transition`` refuses an illegal move
with an error naming both states. ``RestartTracker`` decides what happens when a child exits:
start again after a backoff, stay stopped, or give up (FAILED). It takes ``now`` as an
argument and does no I/O, so it is tested by stepping a number.
"""

from __future__ import annotations

import enum
import signal
from collections import deque
from dataclasses import dataclass

from inference_node.errors import IllegalInstanceTransition
from shared.config.node import RestartConfig


class State(enum.Enum):
    """Where one instance is in its lifecycle."""

    STOPPED = "stopped"
    STARTING = "starting"  # spawned, waiting for its health check
    READY = "ready"  # health check passed
    STOPPING = "stopping"  # SIGTERM sent to its process group, waiting for it to exit
    BACKOFF = "backoff"  # exited unexpectedly, waiting before the next start
    FAILED = "failed"  # gave up (crash loop, bad command, ...); needs a start request

    def __repr__(self) -> str:
        return f"State.{self.name}"


TRANSITIONS: dict[State, frozenset[State]] = {
    State.STOPPED: frozenset({State.STARTING, State.FAILED}),
    State.STARTING: frozenset({State.READY, State.STOPPING, State.BACKOFF, State.FAILED,
                               State.STOPPED}),
    State.READY: frozenset({State.STOPPING, State.BACKOFF, State.FAILED, State.STOPPED}),
    State.STOPPING: frozenset({State.STOPPED, State.BACKOFF, State.FAILED}),
    State.BACKOFF: frozenset({State.STARTING, State.STOPPED, State.FAILED}),
    State.FAILED: frozenset({State.STARTING, State.STOPPED, State.FAILED}),  # FAILED again: a retry failed
}

RUNNING_STATES = frozenset({State.STARTING, State.READY, State.STOPPING})


def check_transition(old: State, new: State) -> None:
    """Raise ``IllegalInstanceTransition`` unless ``old -> new`` is in ``TRANSITIONS``."""
    if new not in TRANSITIONS[old]:
        raise IllegalInstanceTransition(old, new)


def describe_exit(returncode: int) -> str:
    """``"exited with code 1"`` or ``"killed by SIGKILL"`` for a returncode from wait()."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"


class Action(enum.Enum):
    RESTART = "restart"
    STOP = "stop"
    FAIL = "fail"


@dataclass(frozen=True)
class Decision:
    """What to do after a child exited: ``delay_s`` applies to RESTART only."""

    action: Action
    reason: str
    delay_s: float = 0.0


class RestartTracker:
    """Counts recent crashes of one instance and applies its ``[restart]`` policy.

    Backoff doubles from ``backoff_initial_s`` for each crash still inside ``window_s`` and is
    capped at ``backoff_max_s``; more than ``max_restarts`` crashes inside the window is a
    crash loop and ends in FAILED.
    """

    def __init__(self, policy: RestartConfig) -> None:
        self.policy = policy
        self._crashes: deque[float] = deque()

    def reset(self) -> None:
        """Forget past crashes (a person asked for a start, or the config changed)."""
        self._crashes.clear()

    @property
    def recent_crashes(self) -> int:
        return len(self._crashes)

    def on_exit(self, now: float, returncode: int | None, what: str) -> Decision:
        """Decide after an unrequested exit. ``returncode`` None means "never became healthy"."""
        p = self.policy
        if returncode == 0 and p.policy != "always":
            return Decision(Action.STOP, f"{what} (restart.policy = {p.policy!r})")
        if p.policy == "never":
            return Decision(Action.FAIL, f"{what} (restart.policy = 'never')")
        self._crashes.append(now)
        while self._crashes and self._crashes[0] < now - p.window_s:
            self._crashes.popleft()
        count = len(self._crashes)
        if count > p.max_restarts:
            return Decision(
                Action.FAIL,
                f"{what}; crashed {count} times within {p.window_s:g} s "
                f"(restart.max_restarts = {p.max_restarts}), giving up until started again",
            )
        delay = min(p.backoff_max_s, p.backoff_initial_s * 2 ** (count - 1))
        return Decision(Action.RESTART, f"{what}; restart {count} in {delay:g} s", delay)


class HealthStreak:
    """Liveness of a READY instance: counts failed probes in a row and says when it is wedged.

    A probe outcome is None (200) or what went wrong; ``TIMED_OUT`` marks a probe that got no
    answer at all within its budget. ``observe`` returns the reason to restart once
    ``failures`` outcomes in a row failed, and None otherwise. Pure: no clock, no I/O.
    """

    TIMED_OUT = "no answer"

    def __init__(self, failures: int, path: str, probe_timeout_s: float) -> None:
        self.failures = failures
        self.path = path
        self.probe_timeout_s = probe_timeout_s
        self._streak: list[str] = []

    @property
    def failed_in_a_row(self) -> int:
        return len(self._streak)

    def observe(self, problem: str | None) -> str | None:
        """Record one probe's outcome; the wedged reason once the streak reaches ``failures``."""
        if problem is None:
            self._streak.clear()
            return None
        self._streak.append(problem)
        if len(self._streak) < self.failures:
            return None
        n = len(self._streak)
        if all(p == self.TIMED_OUT for p in self._streak):
            return f"health: no answer to {self.path} for {n} probes of {self.probe_timeout_s:g} s"
        return f"health: {self.path} failed {n} probes in a row (last: {problem})"
