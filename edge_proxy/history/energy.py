"""Energy per node and day: what the box drew, and what sleeping saved. Pure: rows and the
time window in, numbers out.

Awake (idle or busy) the box draws its GPUs' watts (the mean of the NVML samples in the
interval, summed over GPUs) plus ``host_idle_w`` for the rest of it; asleep it draws
``host_sleep_w``. Sleeping saves what the box would have drawn awake and idle instead:
``(awake-idle draw - asleep draw) x time asleep``, with the awake-idle draw taken from the
samples of the node's awake-idle intervals. The host watts only a wall meter knows (config).
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from edge_proxy.history.records import GpuSample, PowerInterval

JOULES_PER_KWH: Final = 3.6e6


@dataclass(frozen=True)
class HostPower:
    """A node's draw beside its GPUs, from config (``host_idle_watts``, ``host_sleep_watts``)."""

    idle_w: float
    sleep_w: float


@dataclass
class EnergyRow:
    """One node over one period (a day, or a week when summed)."""

    node: str
    period: str
    asleep_s: float = 0.0
    awake_s: float = 0.0
    busy_s: float = 0.0
    used_kwh: float = 0.0
    saved_kwh: float = 0.0
    # awake seconds without a GPU sample of their own, priced at the awake-idle GPU draw
    estimated_s: float = 0.0

    def money(self, price_per_kwh: float | None) -> tuple[float, float] | None:
        """(used, saved) in money, or None without a price."""
        if price_per_kwh is None:
            return None
        return self.used_kwh * price_per_kwh, self.saved_kwh * price_per_kwh


def _mean_gpu_w(samples: Sequence[GpuSample], start: float, end: float) -> float | None:
    """Sum over GPUs of each GPU's mean watts over its samples in ``[start, end)``."""
    per_gpu: dict[str, list[float]] = defaultdict(list)
    for s in samples:
        if start <= s.t < end and s.power_w is not None:
            per_gpu[s.gpu_uuid].append(s.power_w)
    if not per_gpu:
        return None
    return sum(sum(ws) / len(ws) for ws in per_gpu.values())


def idle_gpu_w(intervals: Iterable[PowerInterval], samples: Sequence[GpuSample]) -> float:
    """The GPUs' awake-idle draw: the mean, per GPU, of samples in ``awake`` intervals, summed;
    0 when there is no such sample (then savings count the host's part only)."""
    per_gpu: dict[str, list[float]] = defaultdict(list)
    spans = [(i.start, i.end) for i in intervals if i.state == "awake"]
    for s in samples:
        if s.power_w is not None and any(a <= s.t < b for a, b in spans):
            per_gpu[s.gpu_uuid].append(s.power_w)
    return sum(sum(ws) / len(ws) for ws in per_gpu.values())


def _day_pieces(start: float, end: float, tz: dt.tzinfo) -> list[tuple[str, float, float]]:
    """``[start, end)`` cut at midnights in ``tz``: (ISO date, piece start, piece end)."""
    pieces = []
    t = start
    while t < end:
        day = dt.datetime.fromtimestamp(t, tz).date()
        midnight = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), tz).timestamp()
        stop = min(end, midnight)
        pieces.append((day.isoformat(), t, stop))
        t = stop
    return pieces


def energy_by_day(node: str, intervals: Sequence[PowerInterval], samples: Sequence[GpuSample],
                  host: HostPower, *, since: float, until: float,
                  tz: dt.tzinfo = dt.UTC) -> list[EnergyRow]:
    """One row per day in ``tz`` that ``node``'s intervals touch within ``[since, until)``."""
    mine = [i for i in intervals if i.node == node]
    gpu = [s for s in samples if s.node == node]
    idle_gpu = idle_gpu_w(mine, gpu)
    awake_idle_w = host.idle_w + idle_gpu
    rows: dict[str, EnergyRow] = {}
    for interval in mine:
        start, end = max(interval.start, since), min(interval.end, until)
        if end <= start:
            continue
        measured = None if interval.state == "asleep" else _mean_gpu_w(gpu, interval.start,
                                                                        interval.end)
        for day, a, b in _day_pieces(start, end, tz):
            row = rows.setdefault(day, EnergyRow(node, day))
            secs = b - a
            if interval.state == "asleep":
                row.asleep_s += secs
                row.used_kwh += host.sleep_w * secs / JOULES_PER_KWH
                row.saved_kwh += (awake_idle_w - host.sleep_w) * secs / JOULES_PER_KWH
                continue
            if interval.state == "busy":
                row.busy_s += secs
            else:
                row.awake_s += secs
            if measured is None:
                row.estimated_s += secs
            gpu_w = idle_gpu if measured is None else measured
            row.used_kwh += (host.idle_w + gpu_w) * secs / JOULES_PER_KWH
    return [rows[d] for d in sorted(rows)]


def by_week(rows: Iterable[EnergyRow]) -> list[EnergyRow]:
    """Day rows summed into ISO weeks (``2026-W49``), per node."""
    weeks: dict[tuple[str, str], EnergyRow] = {}
    for r in rows:
        year, week, _ = dt.date.fromisoformat(r.period).isocalendar()
        key = (r.node, f"{year}-W{week:02d}")
        w = weeks.setdefault(key, EnergyRow(*key))
        w.asleep_s += r.asleep_s
        w.awake_s += r.awake_s
        w.busy_s += r.busy_s
        w.used_kwh += r.used_kwh
        w.saved_kwh += r.saved_kwh
        w.estimated_s += r.estimated_s
    return [weeks[k] for k in sorted(weeks)]
