"""One refresh of the dashboard: the history rows for the window, all of them or only those
written since the page's cursor, and the cursor for its next poll.

The highest row ids are read first, and every query stops at them, so a row written while
the refresh runs comes with the next one instead of being skipped. Rows are not cut at
``now``: a node's clock may run ahead of the proxy's, and a row the cursor passed over would
never come again (the summary clips what it draws to the window). Blocking (SQLite): the
routes run it off the event loop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final

from edge_proxy.dashboard.cursor import Cursor
from edge_proxy.dashboard.source import HistorySource, Row
from edge_proxy.dashboard.summary import WAKE_MATCH_S, HistoryRows, woke_by

# Requests per answer: the page draws each as a point; more than this is a wall of dots.
MAX_REQUEST_ROWS: Final = 5000
# TCP connections per answer: the page lists the newest; more is a long table nobody reads.
MAX_CONNECTION_ROWS: Final = 500


def read_rows(source: HistorySource, since: float, now: float, previous: Cursor | None, *,
              energy: bool) -> tuple[HistoryRows, Cursor]:
    """The rows from ``since`` on (only the new ones after ``previous``) and the cursor
    that ends them; this week's energy only when ``energy`` (it reads the whole week)."""
    latest = Cursor(dict(source.latest_ids()))
    end = math.inf

    def after(table: str) -> int | None:
        return None if previous is None else previous.after(table)

    def through(table: str) -> int:
        return latest.after(table)

    requests = source.requests(since, end, limit=MAX_REQUEST_ROWS, after=after("requests"),
                               through=through("requests"))
    wakes = list(source.wakes(since, end, after=after("wakes"), through=through("wakes")))
    woke = [r for r in requests if r["outcome"] == "woke"]
    if previous is not None:
        # A wake is written when it ends, the request it woke when that request ends: a new
        # request may complete an older wake (its first byte), which goes again.
        older = source.wakes(since, end, through=previous.after("wakes"))
        wakes += [w for w in older if any(woke_by(w, r) for r in woke)]
        if wakes:
            earliest = min(float(w["started"]) for w in wakes) - WAKE_MATCH_S
            woke = [r for r in source.requests(earliest, end, limit=MAX_REQUEST_ROWS,
                                               through=through("requests"))
                    if r["outcome"] == "woke"]
    rows = HistoryRows(
        wakes=_newest_first(wakes),
        gpu_samples=source.gpu_samples(since, end, after=after("gpu_samples"),
                                       through=through("gpu_samples")),
        power_intervals=source.power_intervals(since, end, after=after("power_intervals"),
                                               through=through("power_intervals")),
        busy_intervals=source.busy_intervals(since, end, after=after("busy_intervals"),
                                             through=through("busy_intervals")),
        connections=source.connections(since, end, limit=MAX_CONNECTION_ROWS,
                                       after=after("connections"), through=through("connections")),
        woke_requests=woke,
        energy_week=source.energy_week(now) if energy else None,
        nodes=source.nodes(),
    )
    return rows, latest


def _newest_first(wakes: Sequence[Row]) -> list[Row]:
    return sorted(wakes, key=lambda w: float(w["started"]), reverse=True)
