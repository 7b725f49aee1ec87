"""Health probes of one instance: the start-up check's single probe, and liveness while READY.

llama-server answers its health path from an HTTP thread of its own, also while it generates,
so a READY server that stops answering is wedged (stopped by SIGSTOP, dead-locked, stuck in
a driver call), not busy. ``watch_liveness`` probes on a fixed cadence and returns the reason
once ``health.failures_before_restart`` probes in a row failed; the owner task then kills the
child and respawns it through the restart policy.
"""

from __future__ import annotations

import logging

import trio

from inference_node.supervisor.process import probe_health
from inference_node.supervisor.state import HealthStreak
from shared.config.node import HealthConfig

log = logging.getLogger(__name__)

HEALTHY = 200
# A start-up probe is one small request to loopback; a server that cannot answer in this
# time is not ready yet (the next probe follows after health.interval_s).
START_PROBE_TIMEOUT_S = 2.0


async def probe(host: str, port: int, path: str, timeout_s: float) -> str | None:
    """None when ``path`` answers 200 within ``timeout_s``; otherwise what went wrong."""
    status: int | None = None
    with trio.move_on_after(timeout_s) as scope:
        status = await probe_health(host, port, path)
    if scope.cancelled_caught:
        return HealthStreak.TIMED_OUT
    if status is None:
        return "no HTTP answer (connection refused or closed)"
    if status != HEALTHY:
        return f"HTTP {status}"
    return None


async def watch_liveness(name: str, host: str, port: int, health: HealthConfig) -> str:
    """Probe ``health.path`` every ``liveness_interval_s`` until the server is wedged.

    Returns the reason (``health: no answer to /health for 3 probes of 5 s``) once
    ``failures_before_restart`` probes in a row failed; runs until cancelled otherwise. A
    probe that outlasts the interval delays the next one, so probes never overlap.
    """
    streak = HealthStreak(health.failures_before_restart, health.path, health.liveness_timeout_s)
    next_at = trio.current_time() + health.liveness_interval_s
    while True:
        await trio.sleep_until(next_at)
        next_at = trio.current_time() + health.liveness_interval_s
        problem = await probe(host, port, health.path, health.liveness_timeout_s)
        if problem is not None:
            shown = (f"no answer within {health.liveness_timeout_s:g} s"
                     if problem == HealthStreak.TIMED_OUT else problem)
            log.warning("instance %s: health probe %d of %d failed: GET %s on %s:%d: %s", name,
                        streak.failed_in_a_row + 1, health.failures_before_restart, health.path,
                        host, port, shown)
        reason = streak.observe(problem)
        if reason is not None:
            return reason
