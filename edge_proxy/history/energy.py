"""Energy per node and day: what the box drew, and what sleeping saved. Pure: rows and the
time window in, numbers out.

Each awake interval (the proxy's power states) splits into busy time, when any GPU of the
node had a task (the agent's busy spans, merged over GPUs), and awake-idle time, the rest.
Awake the box draws its GPUs' watts plus ``host_idle_w`` for the rest of it: the busy part
at the mean of the NVML samples taken while busy, the idle part at the mean of those taken
while idle (per GPU, summed over GPUs; a part without samples of its own takes the whole
interval's, and without any the node's awake-idle draw). Asleep it draws ``host_sleep_w``.
Sleeping saves what the box would have drawn awake and idle instead:
``(awake-idle draw - asleep draw) x time asleep``, the awake-idle draw taken from samples
in awake time outside busy spans. The host watts only a wall meter knows (config).
"""

from __future__ import annotations

import bisect
import datetime as dt
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from edge_proxy.history.records import BusyInterval, GpuSample, PowerInterval

JOULES_PER_KWH: Final = 3.6e6
Spans = list[tuple[float, float]]


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


def _gpu_w(samples: Iterable[GpuSample]) -> float | None:
    """Sum over GPUs of each GPU's mean watts over ``samples``; None without any."""
    per_gpu: dict[str, list[float]] = defaultdict(list)
    for s in samples:
        if s.power_w is not None:
            per_gpu[s.gpu_uuid].append(s.power_w)
    if not per_gpu:
        return None
    return sum(sum(ws) / len(ws) for ws in per_gpu.values())


def merge_spans(spans: Iterable[tuple[float, float]]) -> Spans:
    """Spans as disjoint, sorted ``(start, end)`` pairs (overlapping ones joined)."""
    merged: Spans = []
    for start, end in sorted(spans):
        if end <= start:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def split_busy(start: float, end: float, busy: Spans) -> tuple[Spans, Spans]:
    """``[start, end)`` cut into the parts inside ``busy`` (merged spans) and the rest."""
    inside: Spans = []
    outside: Spans = []
    t = start
    for a, b in busy:
        a, b = max(a, start), min(b, end)
        if b <= a:
            continue
        if a > t:
            outside.append((t, a))
        inside.append((a, b))
        t = b
    if t < end:
        outside.append((t, end))
    return inside, outside


def _within(t: float, spans: Spans) -> bool:
    """Whether ``t`` lies in one of ``spans`` (disjoint and sorted)."""
    i = bisect.bisect_right(spans, t, key=lambda span: span[0]) - 1
    return i >= 0 and t < spans[i][1]


def _between(samples: Sequence[GpuSample], times: Sequence[float], start: float,
             end: float) -> Sequence[GpuSample]:
    """The samples (sorted by ``t``, whose times are ``times``) in ``[start, end)``."""
    return samples[bisect.bisect_left(times, start):bisect.bisect_left(times, end)]


def idle_gpu_w(intervals: Iterable[PowerInterval], samples: Sequence[GpuSample],
               busy: Iterable[BusyInterval] = ()) -> float:
    """One node's GPU awake-idle draw (its intervals, samples and busy spans): the mean, per
    GPU, of samples in ``awake`` intervals and outside busy spans, summed; 0 when there is no
    such sample (then savings count the host's part only)."""
    awake = merge_spans((i.start, i.end) for i in intervals if i.state == "awake")
    tasks = merge_spans((b.start, b.end) for b in busy)
    return _gpu_w(s for s in samples if _within(s.t, awake) and not _within(s.t, tasks)) or 0.0


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
                  host: HostPower, *, since: float, until: float, tz: dt.tzinfo = dt.UTC,
                  busy: Sequence[BusyInterval] = ()) -> list[EnergyRow]:
    """One row per day in ``tz`` that ``node``'s intervals touch within ``[since, until)``;
    ``busy`` (the agent's spans) splits awake time into busy and awake idle."""
    mine = [i for i in intervals if i.node == node]
    gpu = sorted((s for s in samples if s.node == node), key=lambda s: s.t)
    times = [s.t for s in gpu]
    tasks = merge_spans((b.start, b.end) for b in busy if b.node == node)
    idle_gpu = idle_gpu_w(mine, gpu, [b for b in busy if b.node == node])
    awake_idle_w = host.idle_w + idle_gpu
    rows: dict[str, EnergyRow] = {}

    def add(day: str, state: str, secs: float, gpu_w: float | None) -> None:
        row = rows.setdefault(day, EnergyRow(node, day))
        if state == "asleep":
            row.asleep_s += secs
            row.used_kwh += host.sleep_w * secs / JOULES_PER_KWH
            row.saved_kwh += (awake_idle_w - host.sleep_w) * secs / JOULES_PER_KWH
            return
        if state == "busy":
            row.busy_s += secs
        else:
            row.awake_s += secs
        if gpu_w is None:
            row.estimated_s += secs
        watts = host.idle_w + (idle_gpu if gpu_w is None else gpu_w)
        row.used_kwh += watts * secs / JOULES_PER_KWH

    for interval in mine:
        start, end = max(interval.start, since), min(interval.end, until)
        if end <= start:
            continue
        if interval.state == "asleep":
            for day, a, b in _day_pieces(start, end, tz):
                add(day, "asleep", b - a, None)
            continue
        # the GPU draw of each part is priced over the whole interval, not the window
        spans = [(interval.start, interval.end)]
        inside, outside = split_busy(interval.start, interval.end, tasks) \
            if interval.state == "awake" else (spans, [])
        during = _between(gpu, times, interval.start, interval.end)
        whole = _gpu_w(during)
        for state, parts in (("busy", inside), ("awake", outside)):
            mean = _gpu_w(s for s in during if _within(s.t, parts))
            gpu_w = mean if mean is not None else whole
            for part_start, part_end in parts:
                a0, b0 = max(part_start, start), min(part_end, end)
                for day, a, b in _day_pieces(a0, b0, tz):
                    add(day, state, b - a, gpu_w)
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
