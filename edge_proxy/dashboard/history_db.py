"""The dashboard's ``HistorySource`` over the history database: ``edge_proxy.history.query``
on a read-only connection per call (WAL lets it read beside the proxy's writer thread), and
``edge_proxy.history.energy`` for this week's kWh.

A database not written yet (history just switched on, nothing recorded) reads as empty, so
the page says "no wakes recorded yet" rather than an error.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from edge_proxy.dashboard.source import Row
from edge_proxy.history import query
from edge_proxy.history.energy import HostPower, by_week, energy_by_day
from shared.config.edge import EdgeConfig, NodeConfig

T = TypeVar("T")
# A node that is in the history but no longer in the config: the config's defaults.
DEFAULT_HOST = HostPower(idle_w=NodeConfig.host_idle_watts, sleep_w=NodeConfig.host_sleep_watts)


def _local_tz() -> dt.tzinfo:
    return dt.datetime.now().astimezone().tzinfo or dt.UTC


def week_start(now: float, tz: dt.tzinfo) -> float:
    """Monday 00:00 in ``tz`` of the ISO week that holds ``now``."""
    day = dt.datetime.fromtimestamp(now, tz).date()
    monday = day - dt.timedelta(days=day.weekday())
    return dt.datetime.combine(monday, dt.time(), tz).timestamp()


class DatabaseHistory:
    """History read from the SQLite file at ``path``; ``hosts`` gives each node's draw
    beside its GPUs (nodes not in it get ``default_host``)."""

    def __init__(self, path: Path, hosts: Mapping[str, HostPower], default_host: HostPower,
                 *, tz: Callable[[], dt.tzinfo] = _local_tz) -> None:
        self.path = path
        self.hosts = dict(hosts)
        self.default_host = default_host
        self._tz = tz

    def __repr__(self) -> str:
        return f"<DatabaseHistory {self.path}>"

    @classmethod
    def from_config(cls, cfg: EdgeConfig) -> DatabaseHistory | None:
        """The history ``cfg`` keeps, or None while ``[history]`` is off."""
        if not cfg.history.enabled:
            return None
        hosts = {name: HostPower(n.host_idle_watts, n.host_sleep_watts)
                 for name, n in cfg.nodes.items()}
        return cls(cfg.history.db_path, hosts, DEFAULT_HOST)

    def _read(self, read: Callable[[Any], list[T]]) -> list[T]:
        if not self.path.exists():
            return []
        with query.open_readonly(self.path) as conn:
            try:
                return read(conn)
            except sqlite3.OperationalError as exc:
                # The writer creates the file a moment before its tables: nothing recorded yet.
                if "no such table" in str(exc):
                    return []
                raise

    def requests(self, since: float, until: float, *, node: str | None = None,
                 model: str | None = None, limit: int | None = None) -> Sequence[Row]:
        flt = query.Filter(since=since, until=until, node=node, model=model, limit=limit)
        return [dataclasses.asdict(r) for r in self._read(lambda c: query.requests(c, flt))]

    def wakes(self, since: float, until: float) -> Sequence[Row]:
        flt = query.Filter(since=since, until=until)
        return [dataclasses.asdict(r) for r in self._read(lambda c: query.wakes(c, flt))]

    def gpu_samples(self, since: float, until: float) -> Sequence[Row]:
        flt = query.Filter(since=since, until=until)
        return [dataclasses.asdict(r) for r in self._read(lambda c: query.gpu_samples(c, flt))]

    def power_intervals(self, since: float, until: float) -> Sequence[Row]:
        flt = query.Filter(since=since, until=until)
        return [dataclasses.asdict(r)
                for r in self._read(lambda c: query.power_intervals(c, flt))]

    def nodes(self) -> Sequence[str]:
        return self._read(query.nodes)

    def energy_week(self, now: float) -> Sequence[Row]:
        tz = self._tz()
        flt = query.Filter(since=week_start(now, tz), until=now)
        intervals = self._read(lambda c: query.power_intervals(c, flt))
        samples = self._read(lambda c: query.gpu_samples(c, flt))
        days = []
        for name in sorted({i.node for i in intervals}):
            host = self.hosts.get(name, self.default_host)
            days += energy_by_day(name, intervals, samples, host, since=flt.since or 0.0,
                                  until=now, tz=tz)
        return [dataclasses.asdict(w) for w in by_week(days)]
