"""A load as the on-demand scheduler follows it: the attempt callers wait on, its outcome,
and how supervisor states read as the policy's phases."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

import trio

from inference_node.ondemand.policy import Phase
from inference_node.supervisor.state import State

# States after which a load is over (BACKOFF: the child died before it was READY).
LOAD_OUTCOMES: Final = frozenset({State.READY, State.FAILED, State.BACKOFF, State.STOPPED})
# Joining a start the supervisor made: its restarts (BACKOFF) are its own business.
JOIN_OUTCOMES: Final = frozenset({State.READY, State.FAILED, State.STOPPED})

PHASES: Final = {State.READY: Phase.READY, State.STARTING: Phase.LOADING,
                 State.BACKOFF: Phase.LOADING, State.STOPPING: Phase.STOPPING,
                 State.STOPPED: Phase.UNLOADED, State.FAILED: Phase.UNLOADED}


@dataclass
class Attempt:
    """One load in flight; every caller asking for the model waits on ``done``."""

    name: str
    reason: str
    started: float
    evicted: tuple[str, ...]
    done: trio.Event = field(default_factory=trio.Event)
    error: str | None = None


@dataclass(frozen=True)
class LoadOutcome:
    instance: str
    reason: str
    evicted: tuple[str, ...]
    load_s: float | None  # None: it was already loaded
