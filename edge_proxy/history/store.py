"""The history database and its one writer thread.

The request path calls a ``Recorder`` (``record_request(...)`` and friends); the real one,
``HistoryRecorder``, puts the row on a bounded queue and returns at once. One thread drains
the queue and writes rows in batches (every ``FLUSH_INTERVAL_S`` or ``BATCH_ROWS`` rows), so
SQLite never runs on the event loop. A full queue drops the row and counts it; a database
that cannot be written (full disk, read-only file or folder) is a logged error, rate-limited,
and never an exception in the caller. Retention (``retention_days``) and the size cap
(``max_mib``) delete the oldest rows.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

import trio

from edge_proxy.history.records import (
    TABLES,
    BusyInterval,
    ConnectionRecord,
    GpuSample,
    InstanceChange,
    PowerInterval,
    Record,
    ReportMark,
    RequestRecord,
    SleepCycle,
    WakeRecord,
    insert_sql,
    row_values,
    schema,
)
from shared.config.edge import HistoryConfig

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S: Final = 0.5
BATCH_ROWS: Final = 500
# Rows waiting for the writer: at 2,000 requests/s, several seconds of a stalled disk.
QUEUE_ROWS: Final = 20_000
PRUNE_INTERVAL_S: Final = 60.0
# One error line per this many seconds: a full disk fails every flush.
ERROR_LOG_INTERVAL_S: Final = 60.0
# Over the size cap, each table gives up this share of its oldest rows per pass.
PRUNE_FRACTION: Final = 0.1
MAX_PRUNE_PASSES: Final = 50
# A write waits this long for a reader (the CLI) to let go of the database.
BUSY_TIMEOUT_S: Final = 5.0
SECONDS_PER_DAY: Final = 86400.0
_STOP: Final = object()


class Recorder(Protocol):
    """What the request path records. Every call returns at once and never raises."""

    def record_request(self, record: RequestRecord) -> None: ...
    def record_connection(self, record: ConnectionRecord) -> None: ...
    def record_wake(self, record: WakeRecord) -> None: ...
    def record_gpu_sample(self, record: GpuSample) -> None: ...
    def record_power_interval(self, record: PowerInterval) -> None: ...
    def record_instance_change(self, record: InstanceChange) -> None: ...
    def record_sleep_cycle(self, record: SleepCycle) -> None: ...
    def record_busy_interval(self, record: BusyInterval) -> None: ...
    def record_report_mark(self, record: ReportMark) -> None: ...


class NullRecorder:
    """The recorder when history is off: keeps nothing."""

    def record_request(self, record: RequestRecord) -> None:
        """Keep nothing."""

    def record_connection(self, record: ConnectionRecord) -> None:
        """Keep nothing."""

    def record_wake(self, record: WakeRecord) -> None:
        """Keep nothing."""

    def record_gpu_sample(self, record: GpuSample) -> None:
        """Keep nothing."""

    def record_power_interval(self, record: PowerInterval) -> None:
        """Keep nothing."""

    def record_instance_change(self, record: InstanceChange) -> None:
        """Keep nothing."""

    def record_sleep_cycle(self, record: SleepCycle) -> None:
        """Keep nothing."""

    def record_busy_interval(self, record: BusyInterval) -> None:
        """Keep nothing."""

    def record_report_mark(self, record: ReportMark) -> None:
        """Keep nothing."""


@dataclass(frozen=True)
class StoreLimits:
    """How much history to keep: rows older than ``retention_days`` go, and the oldest go
    while the database holds more than ``max_bytes``."""

    retention_days: float
    max_bytes: int


@dataclass
class RecorderCounts:
    """What the recorder did; read by metrics and tests."""

    written: int = 0
    dropped_full: int = 0
    dropped_error: int = 0
    write_errors: int = 0
    pruned: int = 0


def connect(path: Path) -> sqlite3.Connection:
    """Open (creating if needed) the database at ``path`` for writing, with the schema."""
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                           check_same_thread=False)
    try:
        # auto_vacuum only takes effect before the first table exists: set it first, so
        # pruned pages can be given back to the file system.
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")  # WAL: durable up to the last checkpoint
        with conn:
            for statement in schema():
                conn.execute(statement)
    except BaseException:
        conn.close()
        raise
    return conn


def used_bytes(conn: sqlite3.Connection) -> int:
    """Bytes the database's live pages take (free pages excluded)."""
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    return int((pages - free) * page_size)


def prune(conn: sqlite3.Connection, limits: StoreLimits, now: float) -> int:
    """Delete rows past retention, then the oldest while over the size cap; return the count."""
    deleted = 0
    cutoff = now - limits.retention_days * SECONDS_PER_DAY
    with conn:
        for table, age in TABLES.values():
            deleted += conn.execute(f"DELETE FROM {table} WHERE {age} < ?", (cutoff,)).rowcount
    for _ in range(MAX_PRUNE_PASSES):
        if used_bytes(conn) <= limits.max_bytes:
            break
        with conn:
            for table, age in TABLES.values():
                (count,) = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
                if count:
                    n = max(1, int(count * PRUNE_FRACTION))
                    deleted += conn.execute(
                        f"DELETE FROM {table} WHERE id IN "
                        f"(SELECT id FROM {table} ORDER BY {age}, id LIMIT ?)", (n,)).rowcount
    # executescript steps it to the end; execute() would free a single page
    conn.executescript("PRAGMA incremental_vacuum;")
    return deleted


class HistoryRecorder:
    """The recorder that keeps history: a bounded queue and one writer thread.

    ``start()`` starts the thread; ``close()`` writes what is queued and joins it. Between
    them, ``record_*`` may be called from any thread (the trio loop in the proxy).
    """

    def __init__(self, path: Path, limits: StoreLimits, *, queue_rows: int = QUEUE_ROWS,
                 flush_interval_s: float = FLUSH_INTERVAL_S, batch_rows: int = BATCH_ROWS,
                 prune_interval_s: float = PRUNE_INTERVAL_S,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.limits = limits
        self.counts = RecorderCounts()
        self._queue: queue.Queue[object] = queue.Queue(maxsize=queue_rows)
        self._flush_interval_s = flush_interval_s
        self._batch_rows = batch_rows
        self._prune_interval_s = prune_interval_s
        self._clock = clock
        self._conn: sqlite3.Connection | None = None
        self._last_error_log = -ERROR_LOG_INTERVAL_S
        self._thread = threading.Thread(target=self._run, name="history-writer", daemon=True)

    def __repr__(self) -> str:
        c = self.counts
        return (f"<HistoryRecorder {self.path} queued={self._queue.qsize()} written={c.written} "
                f"dropped={c.dropped_full + c.dropped_error} errors={c.write_errors}>")

    def start(self) -> None:
        """Start the writer thread."""
        self._thread.start()

    def close(self) -> None:
        """Write what is queued, stop the thread, close the database. Blocks: call it off the
        event loop (``trio.to_thread.run_sync``)."""
        if self._thread.is_alive():
            self._queue.put(_STOP)  # blocking on purpose: the stop must not be dropped
            self._thread.join()

    def record_request(self, record: RequestRecord) -> None:
        """Queue one request row."""
        self._put(record)

    def record_connection(self, record: ConnectionRecord) -> None:
        """Queue one connection row."""
        self._put(record)

    def record_wake(self, record: WakeRecord) -> None:
        """Queue one wake row."""
        self._put(record)

    def record_gpu_sample(self, record: GpuSample) -> None:
        """Queue one GPU sample."""
        self._put(record)

    def record_power_interval(self, record: PowerInterval) -> None:
        """Queue one power-state interval."""
        self._put(record)

    def record_instance_change(self, record: InstanceChange) -> None:
        """Queue one instance change a node reported."""
        self._put(record)

    def record_sleep_cycle(self, record: SleepCycle) -> None:
        """Queue one sleep cycle a node reported."""
        self._put(record)

    def record_busy_interval(self, record: BusyInterval) -> None:
        """Queue one span in which a node's GPU had a task."""
        self._put(record)

    def record_report_mark(self, record: ReportMark) -> None:
        """Queue how far a node's report stream is stored; it goes after the rows queued
        before it, in their transaction or a later one, so it never runs ahead of them."""
        self._put(record)

    def _put(self, record: Record) -> None:
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.counts.dropped_full += 1

    def _run(self) -> None:
        try:
            self._loop()
        except Exception:  # a bug, not a disk problem: say so loudly; callers keep dropping
            log.exception("history: the writer thread failed; history is off until restart")
        finally:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _loop(self) -> None:
        next_prune = self._clock()
        while True:
            batch, stop = self._take_batch()
            if batch:
                self._write(batch)
            now = self._clock()
            if now >= next_prune or stop:
                self._prune(now)
                next_prune = now + self._prune_interval_s
            if stop:
                return

    def _take_batch(self) -> tuple[list[Record], bool]:
        """Wait up to one flush interval for rows; return early with a full batch."""
        batch: list[Record] = []
        deadline = time.monotonic() + self._flush_interval_s
        while len(batch) < self._batch_rows:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=max(remaining, 0.0)) if remaining > 0 \
                    else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            batch.append(item)  # type: ignore[arg-type]
        return batch, False

    def _write(self, batch: list[Record]) -> None:
        by_type: dict[type[Record], list[tuple[object, ...]]] = defaultdict(list)
        for record in batch:
            by_type[type(record)].append(row_values(record))
        try:
            conn = self._connection()
            with conn:
                for cls, rows in by_type.items():
                    conn.executemany(insert_sql(cls), rows)
        except (sqlite3.Error, OSError) as exc:
            self.counts.dropped_error += len(batch)
            self._error(f"cannot write {len(batch)} row(s)", exc)
            return
        self.counts.written += len(batch)

    def _prune(self, now: float) -> None:
        try:
            self.counts.pruned += prune(self._connection(), self.limits, now)
        except (sqlite3.Error, OSError) as exc:
            self._error("cannot prune old rows", exc)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = connect(self.path)
        return self._conn

    def _error(self, what: str, exc: Exception) -> None:
        self.counts.write_errors += 1
        if self._conn is not None:  # reopen next time: the file may have been fixed or moved
            self._conn.close()
            self._conn = None
        now = time.monotonic()
        if now - self._last_error_log >= ERROR_LOG_INTERVAL_S:
            self._last_error_log = now
            log.error("history: %s in %s: %s; check that the folder is writable and the disk "
                      "has room (history.path or history.state_dir in the config)",
                      what, self.path, exc)


@asynccontextmanager
async def open_recorder(cfg: HistoryConfig) -> AsyncIterator[Recorder]:
    """The recorder ``cfg`` asks for, for the body's lifetime: a ``NullRecorder`` when history
    is off, else a ``HistoryRecorder`` whose queue is written out on exit (shielded, so a
    cancelled service still keeps its last rows)."""
    if not cfg.enabled:
        yield NullRecorder()
        return
    recorder = HistoryRecorder(cfg.db_path, limits_of(cfg))
    recorder.start()
    try:
        yield recorder
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(recorder.close)


def limits_of(cfg: HistoryConfig) -> StoreLimits:
    """The store limits a ``[history]`` section sets."""
    return StoreLimits(retention_days=cfg.retention_days, max_bytes=int(cfg.max_mib * (1 << 20)))
