"""Turn llama-server log lines into activity events.

``parse_line(line)`` returns one event or None and never raises, whatever the line holds.
It understands three formats:

- plain text of current builds, with or without the ``0.04.020.310 I `` timestamp/level prefix
  (many lines need ``-lv 4`` since build b9161)::

      slot launch_slot_: id  1 | task 0 | processing task, is_child = 0
      slot      release: id  1 | task 0 | stop processing: n_tokens = 13, truncated = 0
      srv  update_slots: all slots are idle
      srv  llama_server: model loaded
      load_tensors: RPC0[127.0.0.1:33305] model buffer size =     0.33 MiB

- ``--log-jsonl`` of current builds: ``{"type":"log", "msg": "<one plain text line>"}``;
- the structured JSON of ``--log-format json`` (removed in b3761, still in older deployments):
  ``{"msg":"slot is processing task","id_slot":0,"id_task":0,...}`` (``slot_id``/``task_id``
  in even older builds), ``"slot released"``, ``"all slots are idle"``, ``"model loaded"``;
  and the same messages in that era's text format, which forks such as ik_llama.cpp still
  print: ``INFO [   launch_slot_with_task] slot is processing task | tid="1" id_slot=0 id_task=0``.

Patterns are anchored at the start of the message, so text that merely contains the words
(a prompt echoed at high verbosity, a partial line) never becomes a task.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Final, Literal

# A line longer than this is not a log line we know (a dumped prompt, binary junk); skip it
# without running regexes over megabytes.
MAX_LINE_CHARS: Final = 4096

BufferKind = Literal["model", "kv", "compute", "output"]


@dataclass(frozen=True, slots=True)
class TaskStarted:
    """A slot began a task (before its prompt is evaluated)."""

    slot: int
    task: int


@dataclass(frozen=True, slots=True)
class TaskFinished:
    """A slot released its task."""

    slot: int
    task: int


@dataclass(frozen=True, slots=True)
class AllIdle:
    """The server says no slot is processing."""


@dataclass(frozen=True, slots=True)
class ModelLoaded:
    """The model is loaded; a fresh server has no task running."""


@dataclass(frozen=True, slots=True)
class BufferSize:
    """A memory buffer llama.cpp allocated on a device (``CUDA0``, ``CPU_Mapped``, ``RPC0[host:port]``)."""

    kind: BufferKind
    device: str
    mib: float


Event = TaskStarted | TaskFinished | AllIdle | ModelLoaded | BufferSize

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Optional "0.04.020.310 I " prefix (timestamp, then a one-letter level).
_PREFIX = r"^(?:\d+(?:\.\d+)*\s+[A-Z]\s+)?"
_TASK_START = re.compile(
    _PREFIX + r"slot\s+launch_slot\w*:\s+id\s+(\d+)\s+\|\s+task\s+(\d+)\s+\|\s+processing task\b"
)
_TASK_END = re.compile(
    _PREFIX + r"slot\s+release:\s+id\s+(\d+)\s+\|\s+task\s+(\d+)\s+\|\s+stop processing\b"
)
_ALL_IDLE = re.compile(_PREFIX + r"srv\s+update_slots:\s+all slots are idle\s*$")
# "srv  llama_server: model loaded" now; "main: model loaded" in builds of 2024.
_MODEL_LOADED = re.compile(_PREFIX + r"(?:srv\s+)?\w+:\s+model loaded\s*$")
# "load_tensors: CUDA0 model buffer size = 1.0 MiB", "llama_kv_cache: CUDA0 KV buffer size = ...",
# "sched_reserve: CUDA0 compute buffer size = ...", and the older "llm_load_tensors: CUDA0 buffer
# size = ..." where the function names the kind.
_BUFFER = re.compile(
    _PREFIX + r"(\w+):\s+(\S+)\s+(?:(model|KV|compute|output)\s+)?buffer size\s*=\s*"
    r"([0-9]+(?:\.[0-9]+)?)\s*MiB\s*$"
)
_KIND_WORDS: Final[dict[str, BufferKind]] = {
    "model": "model", "KV": "kv", "compute": "compute", "output": "output",
}

# "INFO [            update_slots] slot released | tid="1" id_slot=0 id_task=0 ..."
_KV_TEXT = re.compile(r"^(?:INFO|VERB|WARN|ERR)\s+\[\s*\w+\]\s+([^|]*?)\s*(?:\|(.*))?$")
_KV_PAIR = re.compile(r"(\w+)=(\"[^\"]*\"|\S+)")

# Structured JSON of --log-format json: message -> event kind.
_JSON_TASK_START: Final = "slot is processing task"
_JSON_TASK_END: Final = "slot released"
_JSON_ALL_IDLE: Final = "all slots are idle"
_JSON_MODEL_LOADED: Final = "model loaded"


def parse_line(line: str) -> Event | None:
    """The event a log line reports, or None for every other line (including garbage)."""
    if not line or len(line) > MAX_LINE_CHARS:
        return None
    text = line.strip()
    if text.startswith("{"):
        return _parse_json(text)
    return _parse_text(text)


def _parse_text(text: str) -> Event | None:
    if "\x1b" in text:
        text = _ANSI.sub("", text)
    if text.startswith(("INFO [", "VERB [", "WARN [", "ERR [")):
        return _parse_kv_text(text)
    # Cheap substring tests first: nearly every line is none of these.
    if "processing task" in text:
        m = _TASK_START.match(text)
        return TaskStarted(int(m[1]), int(m[2])) if m else None
    if "stop processing" in text:
        m = _TASK_END.match(text)
        return TaskFinished(int(m[1]), int(m[2])) if m else None
    if text.endswith("all slots are idle"):
        return AllIdle() if _ALL_IDLE.match(text) else None
    if text.endswith("model loaded"):
        return ModelLoaded() if _MODEL_LOADED.match(text) else None
    if "buffer size" in text:
        return _parse_buffer(text)
    return None


def _parse_buffer(text: str) -> BufferSize | None:
    m = _BUFFER.match(text)
    if not m:
        return None
    function, device, word, size = m[1], m[2], m[3], m[4]
    kind: BufferKind | None
    if word is not None:
        kind = _KIND_WORDS[word]
    elif "load_tensors" in function:
        kind = "model"
    elif "kv_cache" in function:
        kind = "kv"
    elif "context" in function:
        kind = "compute"
    else:
        kind = None
    if kind is None:
        return None
    return BufferSize(kind, device, float(size))


def _parse_kv_text(text: str) -> Event | None:
    m = _KV_TEXT.match(text)
    if not m:
        return None
    fields: dict[str, Any] = {}
    for key, value in _KV_PAIR.findall(m[2] or ""):
        fields[key] = int(value) if value.isdigit() else value
    return _structured(m[1], fields)


def _parse_json(text: str) -> Event | None:
    try:
        obj = json.loads(text)
    except ValueError:  # a partial or corrupted line
        return None
    if not isinstance(obj, dict):
        return None
    msg = obj.get("msg")
    if not isinstance(msg, str):
        return None
    if obj.get("type") == "log":  # --log-jsonl wraps one plain text line
        return _parse_text(msg.strip()) if len(msg) <= MAX_LINE_CHARS else None
    return _structured(msg, obj)


def _structured(msg: str, obj: dict[str, Any]) -> Event | None:
    """The event of a message of the structured era (JSON or ``key=value`` text)."""
    if msg == _JSON_TASK_START:
        ids = _json_ids(obj)
        return TaskStarted(*ids) if ids else None
    if msg == _JSON_TASK_END:
        ids = _json_ids(obj)
        return TaskFinished(*ids) if ids else None
    if msg == _JSON_ALL_IDLE:
        return AllIdle()
    if msg == _JSON_MODEL_LOADED:
        return ModelLoaded()
    return None


def _json_ids(obj: dict[str, Any]) -> tuple[int, int] | None:
    slot = obj.get("id_slot", obj.get("slot_id"))
    task = obj.get("id_task", obj.get("task_id"))
    # bool is an int subclass; a task id of true is not a task id.
    if type(slot) is not int or type(task) is not int or slot < 0 or task < 0:
        return None
    return slot, task
