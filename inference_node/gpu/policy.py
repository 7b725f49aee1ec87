"""The P-state policy, pure: observations and ``now`` in, wanted P-states out.

Per GPU: ``high`` while any instance on it is busy; ``low`` once none has been busy for
``low_delay_s`` (so back-to-back requests do not flap the GPU). A GPU first seen idle counts as
idle since that moment. No I/O, no clock: the controller passes ``now`` and applies decisions.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass


class GpuActivity(enum.Enum):
    BUSY = "busy"
    COOLING = "cooling"  # idle, waiting out low_delay_s before going low
    IDLE = "idle"


@dataclass(frozen=True)
class PolicyDecision:
    """The wanted P-state of every observed GPU, and when the policy must run again."""

    wanted: dict[str, int]
    activity: dict[str, GpuActivity]
    wake_at: float  # math.inf when nothing is pending


class PstatePolicy:
    """High while busy, low after ``low_delay_s`` idle. Keyed by whatever GPU key is passed."""

    def __init__(self, *, low: int, high: int, low_delay_s: float) -> None:
        if low_delay_s < 0:
            raise ValueError(f"low_delay_s must be >= 0, not {low_delay_s}")
        self.low = low
        self.high = high
        self.low_delay_s = low_delay_s
        self._idle_since: dict[str, float | None] = {}  # None while busy

    def decide(self, busy: Mapping[str, bool], now: float) -> PolicyDecision:
        """Wanted P-states for the GPUs in ``busy`` (GPU -> any instance on it busy) at ``now``.

        GPUs missing from ``busy`` are forgotten.
        """
        for gone in set(self._idle_since) - set(busy):
            del self._idle_since[gone]
        wanted: dict[str, int] = {}
        activity: dict[str, GpuActivity] = {}
        wake_at = math.inf
        for gpu, is_busy in busy.items():
            if is_busy:
                self._idle_since[gpu] = None
                wanted[gpu], activity[gpu] = self.high, GpuActivity.BUSY
                continue
            since = self._idle_since.get(gpu)
            if since is None:
                since = self._idle_since[gpu] = now
            due = since + self.low_delay_s
            if now >= due:
                wanted[gpu], activity[gpu] = self.low, GpuActivity.IDLE
            else:
                wanted[gpu], activity[gpu] = self.high, GpuActivity.COOLING
                wake_at = min(wake_at, due)
        return PolicyDecision(wanted, activity, wake_at)
