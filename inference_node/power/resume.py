"""Seeing a resume: ``systemctl suspend`` returns before the machine sleeps, so it is detected.

Three signals, whichever comes first: the sleep hook's ``post`` call through the API,
logind's ``PrepareForSleep(false)`` signal, and CLOCK_BOOTTIME running ahead of
CLOCK_MONOTONIC (the monotonic clock, and trio's with it, stops while the machine sleeps).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from dataclasses import dataclass

import trio

log = logging.getLogger(__name__)

# Boottime may drift from monotonic by NTP slewing and scheduling noise; a real suspend is
# at least seconds long. Below this the gap is noise.
MIN_SLEEP_GAP_S = 2.0
CLOCK_POLL_INTERVAL_S = 1.0


def clock_gap() -> float:
    """Seconds the machine has spent suspended since boot (BOOTTIME - MONOTONIC)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME) - time.clock_gettime(time.CLOCK_MONOTONIC)


@dataclass
class GapDetector:
    """Pure: fed successive ``clock_gap()`` readings, says how long each sleep lasted."""

    last_gap: float

    def feed(self, gap: float) -> float | None:
        slept = gap - self.last_gap
        self.last_gap = gap
        return slept if slept >= MIN_SLEEP_GAP_S else None


class ResumeSignal:
    """Where every resume source reports; the power manager waits on it."""

    def __init__(self) -> None:
        self._event = trio.Event()
        self.last_reason = ""

    def fire(self, reason: str) -> None:
        self.last_reason = reason
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def reset(self) -> None:
        if self._event.is_set():
            self._event = trio.Event()

    async def wait(self) -> str:
        await self._event.wait()
        return self.last_reason


async def watch_clock_gap(signal: ResumeSignal) -> None:
    """Fire ``signal`` whenever the boottime/monotonic gap jumps (runs forever)."""
    detector = GapDetector(clock_gap())
    while True:
        await trio.sleep(CLOCK_POLL_INTERVAL_S)
        slept = detector.feed(clock_gap())
        if slept is not None:
            signal.fire(f"clock: slept {slept:.1f} s (CLOCK_BOOTTIME ran ahead of CLOCK_MONOTONIC)")


async def watch_logind(signal: ResumeSignal) -> None:
    """Fire ``signal`` on logind's ``PrepareForSleep(false)``; a no-op without busctl/logind."""
    busctl = shutil.which("busctl")
    if busctl is None:
        log.info("busctl not found: resume is seen from the sleep hook and the clocks only")
        return
    argv = [busctl, "--system", "--json=short", "monitor", "--match",
            "type='signal',interface='org.freedesktop.login1.Manager',member='PrepareForSleep'"]
    try:
        proc = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    except OSError as exc:
        log.info("cannot watch logind (%s): resume is seen from the sleep hook and the clocks", exc)
        return
    try:
        assert proc.stdout is not None
        buf = b""
        async for chunk in proc.stdout:
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if b'"PrepareForSleep"' in line and b'"data":[false]' in line.replace(b" ", b""):
                    signal.fire("logind: PrepareForSleep(false)")
    finally:
        with trio.CancelScope(shield=True):
            proc.kill()
            await proc.wait()
