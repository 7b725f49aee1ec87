"""The dashboard's ``HistorySource`` over the history database: ``edge_proxy.history.query``
on a read-only connection per call (WAL lets it read beside the proxy's writer thread), and
``edge_proxy.history.energy`` for this week's kWh (and money, with a price).

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
                 *, tz: Callable[[], dt.tzinfo] = _local_tz, price_per_kwh: float | None = None,
                 currency: str = "") -> None:
        self.path = path
        self.hosts = dict(hosts)
        self.default_host = default_host
        self.price_per_kwh = price_per_kwh
        self.currency = currency
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
        return cls(cfg.history.db_path, hosts, DEFAULT_HOST,
                   price_per_kwh=cfg.history.price_per_kwh, currency=cfg.history.currency)

    def _read(self, read: Callable[[Any], list[T]]) -> list[T]:
        if not self.path.exists():
            return []
        try:
            with query.open_readonly(self.path) as conn:
                return read(conn)
        except (sqlite3.OperationalError, query.HistoryError) as exc:
            # The writer creates the file a moment before its tables: nothing recorded yet.
            cause = exc.__cause__ if isinstance(exc, query.HistoryError) else exc
            if "no such table" in str(cause):
                return []
            raise

    def requests(self, since: float, until: float, *, node: str | None = None,
                 model: str | None = None, limit: int | None = None,
                 after: int | None = None, through: int | None = None) -> Sequence[Row]:
        flt = query.Filter(since=since, until=until, node=node, model=model, limit=limit,
                           after_id=after, through_id=through)
        return self._rows(query.requests, flt)

    def connections(self, since: float, until: float, *, limit: int | None = None,
                    after: int | None = None, through: int | None = None) -> Sequence[Row]:
        flt = query.Filter(since=since, until=until, limit=limit, after_id=after,
                           through_id=through)
        return self._rows(query.connections, flt)

    def wakes(self, since: float, until: float, *, after: int | None = None,
              through: int | None = None) -> Sequence[Row]:
        return self._rows(query.wakes, _window(since, until, after, through))

    def gpu_samples(self, since: float, until: float, *, after: int | None = None,
                    through: int | None = None) -> Sequence[Row]:
        return self._rows(query.gpu_samples, _window(since, until, after, through))

    def power_intervals(self, since: float, until: float, *, after: int | None = None,
                        through: int | None = None) -> Sequence[Row]:
        return self._rows(query.power_intervals, _window(since, until, after, through))

    def busy_intervals(self, since: float, until: float, *, after: int | None = None,
                       through: int | None = None) -> Sequence[Row]:
        return self._rows(query.busy_intervals, _window(since, until, after, through))

    def _rows(self, read: Callable[[Any, query.Filter], Sequence[Any]],
              flt: query.Filter) -> list[Row]:
        return [dataclasses.asdict(r) for r in self._read(lambda c: list(read(c, flt)))]

    def latest_ids(self) -> Mapping[str, int]:
        found = self._read(lambda c: [query.latest_ids(c)])
        return found[0] if found else {}

    def nodes(self) -> Sequence[str]:
        return self._read(query.nodes)

    def energy_week(self, now: float) -> Sequence[Row]:
        tz = self._tz()
        flt = query.Filter(since=week_start(now, tz), until=now)
        intervals = self._read(lambda c: query.power_intervals(c, flt))
        samples = self._read(lambda c: query.gpu_samples(c, flt))
        busy = self._read(lambda c: query.busy_intervals(c, flt))
        days = []
        for name in sorted({i.node for i in intervals}):
            host = self.hosts.get(name, self.default_host)
            days += energy_by_day(name, intervals, samples, host, since=flt.since or 0.0,
                                  until=now, tz=tz, busy=busy)
        rows = []
        for week in by_week(days):
            money = week.money(self.price_per_kwh)
            rows.append({**dataclasses.asdict(week), "currency": self.currency,
                         "used_money": None if money is None else money[0],
                         "saved_money": None if money is None else money[1]})
        return rows


def _window(since: float, until: float, after: int | None, through: int | None) -> query.Filter:
    return query.Filter(since=since, until=until, after_id=after, through_id=through)
