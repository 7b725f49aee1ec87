"""The rows history keeps, one frozen dataclass per table, and the schema that stores them.

Times are Unix seconds (``time.time()``): rows outlive the process, so the monotonic clock
means nothing in them. Durations are milliseconds (``_ms``) or seconds (``_s``), as named.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Final, Literal

# How an HTTP request on a route ended, as a person reads it in the history table.
Outcome = Literal["cache", "relayed", "woke", "loaded", "timeout", "client_left", "refused",
                  "load_failed"]
OUTCOMES: Final = ("cache", "relayed", "woke", "loaded", "timeout", "client_left", "refused",
                   "load_failed")
PowerState = Literal["asleep", "awake", "busy"]
POWER_STATES: Final = ("asleep", "awake", "busy")


@dataclass(frozen=True)
class RequestRecord:
    """One request on an HTTP route. ``held_ms`` is the time it waited for a wake or a load;
    the token numbers are llama-server's own (``timings``/``usage``), None when it sent none."""

    t: float
    route: str
    node: str
    model: str | None
    method: str
    path: str
    status: int | None
    outcome: Outcome
    held_ms: float = 0.0
    ttfb_ms: float | None = None
    total_ms: float | None = None
    prompt_tokens: int | None = None
    predicted_tokens: int | None = None
    prompt_per_s: float | None = None
    predicted_per_s: float | None = None


@dataclass(frozen=True)
class ConnectionRecord:
    """One relayed TCP connection, recorded when it closes."""

    t: float
    route: str
    node: str
    bytes_up: int
    bytes_down: int
    duration_ms: float
    held_ms: float = 0.0
    woke: bool = False


@dataclass(frozen=True)
class WakeRecord:
    """One wake of a node: the steps from the first magic packet to ready, in ms after
    ``started``; a step the wake never reached (or the driver cannot see) is None."""

    node: str
    started: float
    outcome: str
    reason: str = ""
    packets: int = 0
    host_up_ms: float | None = None
    port_open_ms: float | None = None
    ready_ms: float | None = None
    total_ms: float | None = None


@dataclass(frozen=True)
class GpuSample:
    """One GPU of a node at one time, keyed by UUID (NVML, CUDA and NVAPI orders differ)."""

    t: float
    node: str
    gpu_uuid: str
    utilization_pct: float | None = None
    memory_used_mib: float | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    pstate_wanted: int | None = None
    pstate_read: int | None = None


@dataclass(frozen=True)
class PowerInterval:
    """A closed span ``[start, end)`` in which a node was in one power state."""

    node: str
    state: PowerState
    start: float
    end: float


@dataclass(frozen=True)
class BusyInterval:
    """A closed span ``[start, end)`` in which a GPU of a node had a task (the agent's
    report: an instance on that GPU was busy)."""

    node: str
    gpu_uuid: str
    start: float
    end: float


@dataclass(frozen=True)
class ReportMark:
    """How far the proxy stored a node's report stream: kept with the rows, so a batch
    re-sent after a proxy restart is still known as stored. One row per node."""

    node: str
    stream: str
    stored_through: int


@dataclass(frozen=True)
class InstanceChange:
    """A node's instance was loaded, unloaded or crashed (the agent's report)."""

    t: float
    node: str
    instance: str
    change: str  # "loaded", "unloaded" or "crashed"
    state: str
    reason: str = ""


@dataclass(frozen=True)
class SleepCycle:
    """One suspend attempt of a node (the agent's report): its phases in seconds, and its
    steps as JSON ``[[name, seconds after the start], ...]``."""

    t: float
    node: str
    outcome: str  # "slept", "failed" or "vetoed"
    detail: str = ""
    idle_to_suspend_s: float | None = None
    suspend_to_resume_s: float | None = None
    resume_to_ready_s: float | None = None
    steps: str = "[]"


Record = (RequestRecord | ConnectionRecord | WakeRecord | GpuSample | PowerInterval
          | BusyInterval | InstanceChange | SleepCycle | ReportMark)

# table name, the column that orders it by age, and the dataclass behind it
TABLES: Final[dict[type[Record], tuple[str, str]]] = {
    RequestRecord: ("requests", "t"),
    ConnectionRecord: ("connections", "t"),
    WakeRecord: ("wakes", "started"),
    GpuSample: ("gpu_samples", "t"),
    PowerInterval: ("power_intervals", "start"),
    BusyInterval: ("busy_intervals", "start"),
    InstanceChange: ("instance_changes", "t"),
    SleepCycle: ("sleep_cycles", "t"),
}

# Not history but bookkeeping: never pruned, one row per node, replaced as batches arrive.
MARKS_TABLE: Final = "report_marks"

_SQL_TYPES: Final = {"float": "REAL", "int": "INTEGER", "bool": "INTEGER", "str": "TEXT"}


def _sql_type(annotation: str) -> str:
    base = annotation.split("|")[0].strip()
    return _SQL_TYPES.get(base, "TEXT")  # Literal[...] aliases are text


def columns(cls: type[Record]) -> list[str]:
    """The column names of ``cls``'s table, in field order."""
    return [f.name for f in dataclasses.fields(cls)]


def schema() -> list[str]:
    """``CREATE`` statements for every table and the indexes the queries use."""
    statements = []
    for cls, (table, age) in TABLES.items():
        cols = ", ".join(f"{f.name} {_sql_type(str(f.type))}" for f in dataclasses.fields(cls))
        statements.append(f"CREATE TABLE IF NOT EXISTS {table} "
                          f"(id INTEGER PRIMARY KEY, {cols})")
        statements.append(f"CREATE INDEX IF NOT EXISTS {table}_{age} ON {table} ({age})")
        statements.append(f"CREATE INDEX IF NOT EXISTS {table}_node_{age} ON {table} "
                          f"(node, {age})")
    statements.append(f"CREATE TABLE IF NOT EXISTS {MARKS_TABLE} "
                      "(node TEXT PRIMARY KEY, stream TEXT, stored_through INTEGER)")
    return statements


def insert_sql(cls: type[Record]) -> str:
    """The parameterized ``INSERT`` for one row of ``cls`` (a mark replaces its node's)."""
    if cls is ReportMark:
        return (f"INSERT INTO {MARKS_TABLE} (node, stream, stored_through) VALUES (?, ?, ?) "
                "ON CONFLICT(node) DO UPDATE SET stream = excluded.stream, "
                "stored_through = excluded.stored_through")
    table, _ = TABLES[cls]
    cols = columns(cls)
    return f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"


def row_values(record: Record) -> tuple[object, ...]:
    """The values of ``record`` in column order (booleans as 0/1, as SQLite stores them)."""
    return dataclasses.astuple(record)
