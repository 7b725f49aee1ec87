"""What the dashboard reads from history: a narrow Protocol over the history queries
(``edge_proxy.history.query``: ``requests``, ``wakes``, ``gpu_samples``, ``power_intervals``,
``busy_intervals``, ``connections``, ``nodes``), each for a time window and optionally only
the rows written after one row id and up to another (``after``, ``through``: what is new
since the page last looked, see ``cursor``), plus the energy of the current week.

Rows are the history's records field for field, as plain mappings (``dataclasses.asdict``):
the dashboard sends them on as JSON and reads a few fields itself. Calls block (SQLite):
the routes run them off the event loop. A database that cannot be read raises
``LlamanapError`` with a one-line message, which the page shows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

Row = Mapping[str, Any]


class HistorySource(Protocol):
    """The history queries the dashboard needs, each over ``[since, until)`` in Unix s; a
    row id range ``(after, through]`` narrows each to the rows written in it."""

    def requests(self, since: float, until: float, *, node: str | None = None,
                 model: str | None = None, limit: int | None = None,
                 after: int | None = None, through: int | None = None) -> Sequence[Row]:
        """Requests on HTTP routes, newest first."""
        ...

    def connections(self, since: float, until: float, *, limit: int | None = None,
                    after: int | None = None, through: int | None = None) -> Sequence[Row]:
        """Connections on TCP routes, newest first."""
        ...

    def wakes(self, since: float, until: float, *, after: int | None = None,
              through: int | None = None) -> Sequence[Row]:
        """Wakes that started in the window, newest first."""
        ...

    def gpu_samples(self, since: float, until: float, *, after: int | None = None,
                    through: int | None = None) -> Sequence[Row]:
        """GPU samples, oldest first."""
        ...

    def power_intervals(self, since: float, until: float, *, after: int | None = None,
                        through: int | None = None) -> Sequence[Row]:
        """Closed power-state intervals that overlap the window, oldest first."""
        ...

    def busy_intervals(self, since: float, until: float, *, after: int | None = None,
                       through: int | None = None) -> Sequence[Row]:
        """Spans in which a GPU had a task that overlap the window, oldest first."""
        ...

    def latest_ids(self) -> Mapping[str, int]:
        """Per table, the highest row id written so far."""
        ...

    def nodes(self) -> Sequence[str]:
        """Every node the history mentions."""
        ...

    def energy_week(self, now: float) -> Sequence[Row]:
        """Per node, the ISO week that holds ``now``: ``node``, ``period``, ``asleep_s``,
        ``awake_s`` (awake idle), ``busy_s``, ``used_kwh``, ``saved_kwh``, ``estimated_s``,
        and ``used_money``, ``saved_money`` (None without a price) in ``currency``."""
        ...
