"""Reading history back: for ``edge-proxy history``/``energy``, the dashboard, and the
proxy's report marks at start.

The database is opened read-only, so the CLI works beside a running proxy (WAL lets readers
and the writer overlap) and with the proxy stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_proxy.history.records import (
    MARKS_TABLE,
    TABLES,
    BusyInterval,
    ConnectionRecord,
    GpuSample,
    PowerInterval,
    Record,
    ReportMark,
    RequestRecord,
    WakeRecord,
    columns,
)
from shared.errors import LlamanapError

log = logging.getLogger(__name__)


class HistoryError(LlamanapError):
    """The history database cannot be read."""


@dataclass(frozen=True)
class Filter:
    """Which rows to read: at or after ``since`` (Unix s), before ``until``, one node or all;
    ``after_id``/``through_id`` keep rows written after one read and up to another (row ids
    rise as rows are written, so a reader can ask for what is new since it last looked)."""

    since: float | None = None
    until: float | None = None
    node: str | None = None
    model: str | None = None
    limit: int | None = None
    after_id: int | None = None
    through_id: int | None = None


def _id_range(flt: Filter) -> tuple[list[str], list[Any]]:
    where, args = [], []  # type: list[str], list[Any]
    if flt.after_id is not None:
        where.append("id > ?")
        args.append(flt.after_id)
    if flt.through_id is not None:
        where.append("id <= ?")
        args.append(flt.through_id)
    return where, args


@contextmanager
def open_readonly(path: Path) -> Iterator[sqlite3.Connection]:
    """The database at ``path`` for reading; a missing or unreadable file is a ``HistoryError``."""
    if not path.is_file():
        raise HistoryError(f"no history database at {path}; set [history] enabled = true "
                           "and run the proxy, or pass --db PATH")
    try:
        conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
        conn.execute("SELECT count(*) FROM requests").fetchone()
    except sqlite3.Error as exc:
        raise HistoryError(f"cannot read the history database {path}: {exc}") from exc
    try:
        yield conn
    finally:
        conn.close()


def _select(conn: sqlite3.Connection, cls: type[Record], flt: Filter, *,
            newest_first: bool) -> list[Any]:
    table, age = TABLES[cls]
    where, args = [], []  # type: list[str], list[Any]
    if flt.since is not None:
        where.append(f"{age} >= ?")
        args.append(flt.since)
    if flt.until is not None:
        where.append(f"{age} < ?")
        args.append(flt.until)
    if flt.node is not None:
        where.append("node = ?")
        args.append(flt.node)
    if flt.model is not None and cls is RequestRecord:
        where.append("model = ?")
        args.append(flt.model)
    ids, id_args = _id_range(flt)
    where += ids
    args += id_args
    sql = f"SELECT {', '.join(columns(cls))} FROM {table}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += f" ORDER BY {age} {'DESC' if newest_first else 'ASC'}, id"
    if flt.limit is not None:
        sql += " LIMIT ?"
        args.append(flt.limit)
    try:
        rows = conn.execute(sql, args).fetchall()
    except sqlite3.Error as exc:
        raise HistoryError(f"cannot read {table} from the history database: {exc}") from exc
    return [cls(*row) for row in rows]


def requests(conn: sqlite3.Connection, flt: Filter = Filter()) -> list[RequestRecord]:
    """HTTP requests, newest first."""
    return _select(conn, RequestRecord, flt, newest_first=True)


def connections(conn: sqlite3.Connection, flt: Filter = Filter()) -> list[ConnectionRecord]:
    """TCP connections, newest first."""
    rows: list[ConnectionRecord] = _select(conn, ConnectionRecord, flt, newest_first=True)
    return [dataclasses.replace(r, woke=bool(r.woke)) for r in rows]


def wakes(conn: sqlite3.Connection, flt: Filter = Filter()) -> list[WakeRecord]:
    """Wakes, newest first."""
    return _select(conn, WakeRecord, flt, newest_first=True)


def gpu_samples(conn: sqlite3.Connection, flt: Filter = Filter()) -> list[GpuSample]:
    """GPU samples, oldest first (the order energy integrates them in)."""
    return _select(conn, GpuSample, flt, newest_first=False)


def power_intervals(conn: sqlite3.Connection, flt: Filter = Filter()) -> list[PowerInterval]:
    """Power-state intervals that overlap ``[since, until)``, oldest first."""
    return _overlapping(conn, PowerInterval, flt)


def busy_intervals(conn: sqlite3.Connection, flt: Filter = Filter()) -> list[BusyInterval]:
    """Spans in which a GPU had a task that overlap ``[since, until)``, oldest first."""
    return _overlapping(conn, BusyInterval, flt)


def _overlapping(conn: sqlite3.Connection, cls: type[PowerInterval] | type[BusyInterval],
                 flt: Filter) -> list[Any]:
    table, _ = TABLES[cls]
    # an interval that began before ``since`` still counts for the part after it
    sql = f"SELECT {', '.join(columns(cls))} FROM {table} WHERE end > ?"
    args: list[Any] = [flt.since if flt.since is not None else float("-inf")]
    if flt.until is not None:
        sql += " AND start < ?"
        args.append(flt.until)
    if flt.node is not None:
        sql += " AND node = ?"
        args.append(flt.node)
    ids, id_args = _id_range(flt)
    sql += "".join(f" AND {w}" for w in ids)
    args += id_args
    try:
        rows = conn.execute(sql + " ORDER BY start, id", args).fetchall()
    except sqlite3.Error as exc:
        if "no such table" in str(exc):  # a database the proxy has not opened since its
            return []                    # version added the table: no such rows yet
        raise HistoryError(f"cannot read {table} from the history database: {exc}") from exc
    return [cls(*row) for row in rows]


def report_marks(conn: sqlite3.Connection) -> list[ReportMark]:
    """How far each node's report stream is stored (none in a database that predates them)."""
    try:
        rows = conn.execute(f"SELECT node, stream, stored_through FROM {MARKS_TABLE} "
                            "ORDER BY node").fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise HistoryError(f"cannot read {MARKS_TABLE} from the history database: {exc}") \
            from exc
    return [ReportMark(*row) for row in rows]


def latest_ids(conn: sqlite3.Connection) -> dict[str, int]:
    """Per table, the highest row id written so far (0: none yet)."""
    latest = {}
    for table, _ in TABLES.values():
        try:
            (top,) = conn.execute(f"SELECT max(id) FROM {table}").fetchone()
        except sqlite3.OperationalError as exc:
            if "no such table" not in str(exc):
                raise HistoryError(f"cannot read {table} from the history database: {exc}") \
                    from exc
            top = 0  # not created yet: nothing written to it
        latest[table] = top or 0
    return latest


def nodes(conn: sqlite3.Connection) -> list[str]:
    """Every node any table mentions, sorted."""
    names: set[str] = set()
    for table, _ in TABLES.values():
        names.update(n for (n,) in conn.execute(f"SELECT DISTINCT node FROM {table}"))
    return sorted(names)


def stored_marks(path: Path) -> list[ReportMark]:
    """The report marks in the database at ``path``; none when it does not exist yet (the
    writer creates it with its first rows) or cannot be read (then the proxy starts over,
    as it would without history, and says why)."""
    if not path.is_file():
        return []
    try:
        with open_readonly(path) as conn:
            return report_marks(conn)
    except HistoryError as exc:
        log.warning("history: %s; reports re-sent after this restart may be stored twice", exc)
        return []
