"""What a node reports to the edge proxy: GPU samples, busy spans, instance changes, sleep
cycles.

The agent POSTs a batch to the proxy's control endpoint (``REPORTS_PATH``, the proxy's bearer
token) and the proxy answers with how far it has stored that stream::

    → {"node": "gpubox", "stream": "9f2c41d07a3e", "dropped": 0, "records": [
         {"seq": 41, "t": 1764650000.5, "kind": "gpu", "gpu_uuid": "GPU-…",
          "utilization_pct": 97, "memory_used_mib": 20480.0, "memory_total_mib": 24576.0,
          "temperature_c": 71, "power_w": 180.2, "pstate_wanted": 16, "pstate_read": 0},
         {"seq": 42, "t": 1764650001.0, "kind": "instance", "instance": "qwen",
          "change": "crashed", "state": "BACKOFF", "reason": "exited with code 1"},
         {"seq": 43, "t": 1764650900.0, "kind": "cycle", "outcome": "slept",
          "detail": "slept and resumed", "steps": [["stopping instances", 0.01], …],
          "idle_to_suspend_s": 0.5, "suspend_to_resume_s": 2.0, "resume_to_ready_s": 4.1},
         {"seq": 44, "t": 1764650960.0, "kind": "busy", "gpu_uuid": "GPU-…",
          "start": 1764650950.2, "end": 1764650960.0}]}
    ← {"node": "gpubox", "stream": "9f2c41d07a3e", "stored_through": 43, "duplicates": 0}

``stream`` names one run of the agent (random at start); ``seq`` counts that stream's records
from 1, with no gaps except those the agent's bounded buffer dropped (``dropped`` says how
many so far). The proxy stores a record once: one whose ``seq`` is at or below what it has
stored for the stream is a duplicate (a retry after a lost reply) and skipped. The agent
forgets records up to ``stored_through`` and sends the rest again later, in order.

A ``busy`` record is a closed span ``[start, end)`` (Unix seconds) in which an instance on
that GPU ran a task; a long span is cut into pieces so a crash loses little of it.

Times ``t`` are Unix seconds (the rows outlive both processes). Cycle step times are seconds
after the cycle began on the agent's monotonic clock, which stops while the machine sleeps:
``suspend_to_resume_s`` is the awake part of a sleep (the time the suspend took to happen and
to be noticed afterwards), not the time asleep. ``decode_*`` validate every field and raise
``ReportError`` naming the field, so a malformed batch is refused whole, never half-stored.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Final, Literal, get_args

from shared.errors import LlamanapError
from shared.events import parse_object

REPORTS_PATH: Final = "/v1/reports"
RecordKind = Literal["gpu", "instance", "cycle", "busy"]
RECORD_KINDS: Final[tuple[str, ...]] = get_args(RecordKind)
InstanceChange = Literal["loaded", "unloaded", "crashed"]
INSTANCE_CHANGES: Final[tuple[str, ...]] = get_args(InstanceChange)
CycleOutcome = Literal["slept", "failed", "vetoed"]
CYCLE_OUTCOMES: Final[tuple[str, ...]] = get_args(CycleOutcome)
MAX_BATCH_RECORDS: Final = 1000  # the agent sends fewer; more is a bug on the sending side
MAX_TEXT_CHARS: Final = 500  # reasons and details go into logs and rows
MAX_NAME_CHARS: Final = 100
MAX_STEPS: Final = 50
MAX_STREAM_CHARS: Final = 64


class ReportError(LlamanapError):
    """A report batch or reply does not fit the schema (the sender's fault)."""


@dataclass(frozen=True)
class GpuReport:
    """One GPU at one time, keyed by UUID. A reading NVML could not take is None."""

    seq: int
    t: float
    gpu_uuid: str
    utilization_pct: float | None = None
    memory_used_mib: float | None = None
    memory_total_mib: float | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    pstate_wanted: int | None = None
    pstate_read: int | None = None
    kind: Literal["gpu"] = "gpu"

    @property
    def memory_pct(self) -> float | None:
        """Memory used as a share of the total, in percent (None: either is unknown)."""
        if self.memory_used_mib is None or not self.memory_total_mib:
            return None
        return 100.0 * self.memory_used_mib / self.memory_total_mib


@dataclass(frozen=True)
class InstanceReport:
    """An instance was loaded (READY), unloaded (stopped) or crashed (exited unasked)."""

    seq: int
    t: float
    instance: str
    change: InstanceChange
    state: str
    reason: str = ""
    kind: Literal["instance"] = "instance"


@dataclass(frozen=True)
class CycleReport:
    """One suspend attempt, once it ended: the steps with their times after its start."""

    seq: int
    t: float
    outcome: CycleOutcome
    detail: str
    steps: tuple[tuple[str, float], ...] = ()
    idle_to_suspend_s: float | None = None
    suspend_to_resume_s: float | None = None
    resume_to_ready_s: float | None = None
    kind: Literal["cycle"] = "cycle"


@dataclass(frozen=True)
class BusyReport:
    """A GPU had a task (an instance on it was busy) over ``[start, end)``, Unix seconds."""

    seq: int
    t: float
    gpu_uuid: str
    start: float
    end: float
    kind: Literal["busy"] = "busy"


Report = GpuReport | InstanceReport | CycleReport | BusyReport


@dataclass(frozen=True)
class ReportBatch:
    """Records of one stream of one node, in ``seq`` order."""

    node: str
    stream: str
    records: tuple[Report, ...]
    dropped: int = 0

    def encode(self) -> bytes:
        return json.dumps({"node": self.node, "stream": self.stream, "dropped": self.dropped,
                           "records": [encode_record(r) for r in self.records]}).encode()


@dataclass(frozen=True)
class ReportReply:
    """The proxy's answer: every record of ``stream`` up to ``stored_through`` is stored."""

    node: str
    stream: str
    stored_through: int
    duplicates: int = 0

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()


def encode_record(record: Report) -> dict[str, Any]:
    """The JSON object of one record (steps as ``[name, seconds]`` pairs)."""
    obj = asdict(record)
    if isinstance(record, CycleReport):
        obj["steps"] = [[name, at] for name, at in record.steps]
    return obj


_FIELDS: Final[dict[str, frozenset[str]]] = {
    "gpu": frozenset({"seq", "t", "kind", "gpu_uuid", "utilization_pct", "memory_used_mib",
                      "memory_total_mib", "temperature_c", "power_w", "pstate_wanted",
                      "pstate_read"}),
    "instance": frozenset({"seq", "t", "kind", "instance", "change", "state", "reason"}),
    "cycle": frozenset({"seq", "t", "kind", "outcome", "detail", "steps", "idle_to_suspend_s",
                        "suspend_to_resume_s", "resume_to_ready_s"}),
    "busy": frozenset({"seq", "t", "kind", "gpu_uuid", "start", "end"}),
}


def decode_batch(data: bytes | str | Any) -> ReportBatch:
    """Parse and validate a batch; records must be in strictly rising ``seq`` order."""
    obj = _parse(data)
    _only_keys(obj, {"node", "stream", "dropped", "records"}, "")
    records = obj.get("records")
    if not isinstance(records, list):
        raise ReportError(f"records: found {type(records).__name__}; expected a list")
    if len(records) > MAX_BATCH_RECORDS:
        raise ReportError(f"records: {len(records)} in one batch; at most {MAX_BATCH_RECORDS}")
    decoded = tuple(decode_record(r, f"records[{i}]") for i, r in enumerate(records))
    for i in range(1, len(decoded)):
        if decoded[i].seq <= decoded[i - 1].seq:
            raise ReportError(f"records[{i}].seq: {decoded[i].seq} after {decoded[i - 1].seq}; "
                              "expected rising sequence numbers")
    return ReportBatch(node=_string(obj, "node", "", limit=MAX_NAME_CHARS),
                       stream=_string(obj, "stream", "", limit=MAX_STREAM_CHARS),
                       records=decoded, dropped=_count(obj, "dropped", "", required=False))


def decode_record(data: Any, where: str = "record") -> Report:
    """Validate one record (an already-parsed JSON object)."""
    if not isinstance(data, dict):
        raise ReportError(f"{where}: found {type(data).__name__}; expected a JSON object")
    kind = data.get("kind")
    if kind not in RECORD_KINDS:
        raise ReportError(f"{where}.kind: found {kind!r}; allowed: {', '.join(RECORD_KINDS)}")
    _only_keys(data, _FIELDS[kind], where)
    seq = _count(data, "seq", where, required=True)
    if seq < 1:
        raise ReportError(f"{where}.seq: found {seq}; sequence numbers start at 1")
    t = _number(data, "t", where, required=True)
    assert t is not None
    if kind == "gpu":
        return GpuReport(
            seq, t, _string(data, "gpu_uuid", where, limit=MAX_NAME_CHARS),
            utilization_pct=_number(data, "utilization_pct", where),
            memory_used_mib=_number(data, "memory_used_mib", where),
            memory_total_mib=_number(data, "memory_total_mib", where),
            temperature_c=_number(data, "temperature_c", where),
            power_w=_number(data, "power_w", where),
            pstate_wanted=_pstate(data, "pstate_wanted", where),
            pstate_read=_pstate(data, "pstate_read", where))
    if kind == "busy":
        start = _number(data, "start", where, required=True)
        end = _number(data, "end", where, required=True)
        assert start is not None and end is not None
        if end < start:
            raise ReportError(f"{where}.end: found {end!r} before start {start!r}; expected "
                              "end >= start")
        return BusyReport(seq, t, _string(data, "gpu_uuid", where, limit=MAX_NAME_CHARS),
                          start, end)
    if kind == "instance":
        change = data.get("change")
        if change not in INSTANCE_CHANGES:
            raise ReportError(f"{where}.change: found {change!r}; allowed: "
                              f"{', '.join(INSTANCE_CHANGES)}")
        return InstanceReport(seq, t, _string(data, "instance", where, limit=MAX_NAME_CHARS),
                              change, _string(data, "state", where, limit=MAX_NAME_CHARS),
                              _string(data, "reason", where, limit=MAX_TEXT_CHARS, required=False))
    outcome = data.get("outcome")
    if outcome not in CYCLE_OUTCOMES:
        raise ReportError(f"{where}.outcome: found {outcome!r}; allowed: "
                          f"{', '.join(CYCLE_OUTCOMES)}")
    return CycleReport(
        seq, t, outcome, _string(data, "detail", where, limit=MAX_TEXT_CHARS, required=False),
        _steps(data.get("steps", []), f"{where}.steps"),
        idle_to_suspend_s=_number(data, "idle_to_suspend_s", where, minimum=0.0),
        suspend_to_resume_s=_number(data, "suspend_to_resume_s", where, minimum=0.0),
        resume_to_ready_s=_number(data, "resume_to_ready_s", where, minimum=0.0))


def decode_reply(data: bytes | str | Any) -> ReportReply:
    """Parse and validate the proxy's reply."""
    obj = _parse(data)
    _only_keys(obj, {"node", "stream", "stored_through", "duplicates"}, "")
    return ReportReply(node=_string(obj, "node", "", limit=MAX_NAME_CHARS),
                       stream=_string(obj, "stream", "", limit=MAX_STREAM_CHARS),
                       stored_through=_count(obj, "stored_through", "", required=True),
                       duplicates=_count(obj, "duplicates", "", required=False))


def _parse(data: bytes | str | Any) -> dict[str, Any]:
    return parse_object(data, ReportError)


def _key(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _only_keys(obj: dict[str, Any], allowed: set[str] | frozenset[str], where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise ReportError(f"{_key(where, unknown[0])}: unknown field; allowed: "
                          f"{', '.join(sorted(allowed))}")


def _string(obj: dict[str, Any], key: str, where: str, *, limit: int,
            required: bool = True) -> str:
    value = obj.get(key, None if required else "")
    if not isinstance(value, str) or (required and not value):
        raise ReportError(f"{_key(where, key)}: found {value!r}; expected a non-empty string")
    if len(value) > limit:
        raise ReportError(f"{_key(where, key)}: {len(value)} characters; at most {limit} allowed")
    return value


def _count(obj: dict[str, Any], key: str, where: str, *, required: bool) -> int:
    value = obj.get(key, None if required else 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ReportError(f"{_key(where, key)}: found {value!r}; expected a count >= 0")
    return value


def _number(obj: dict[str, Any], key: str, where: str, *, required: bool = False,
            minimum: float | None = None) -> float | None:
    value = obj.get(key)
    if value is None and not required:
        return None
    if (not isinstance(value, int | float) or isinstance(value, bool)
            or not math.isfinite(value) or (minimum is not None and value < minimum)):
        allowed = "a finite number" + (f" >= {minimum:g}" if minimum is not None else "")
        raise ReportError(f"{_key(where, key)}: found {value!r}; expected {allowed}"
                          + ("" if required else " or null"))
    return float(value)


def _pstate(obj: dict[str, Any], key: str, where: str) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 16:
        raise ReportError(f"{_key(where, key)}: found {value!r}; expected 0..16 or null")
    return value


def _steps(value: Any, where: str) -> tuple[tuple[str, float], ...]:
    if not isinstance(value, list) or len(value) > MAX_STEPS:
        raise ReportError(f"{where}: expected a list of at most {MAX_STEPS} [name, seconds] pairs")
    steps = []
    for i, step in enumerate(value):
        ok = (isinstance(step, list) and len(step) == 2 and isinstance(step[0], str)
              and 0 < len(step[0]) <= MAX_TEXT_CHARS and isinstance(step[1], int | float)
              and not isinstance(step[1], bool) and math.isfinite(step[1]) and step[1] >= 0)
        if not ok:
            raise ReportError(f"{where}[{i}]: found {step!r}; expected [name, seconds >= 0]")
        steps.append((step[0], float(step[1])))
    return tuple(steps)
