"""The node-agent ↔ edge-proxy event protocol: one schema, used by both services.

The agent POSTs an event to the proxy's control endpoint (``EVENTS_PATH``) with the proxy's
bearer token; the proxy answers with an ``EventReply``::

    → {"event": "suspending", "node": "gpubox", "reason": "idle for 900 s"}
    ← {"node": "gpubox", "allowed": true, "state": "DRAINING", "in_flight": 0, "held": 0,
       "reason": "no connections open"}

``suspending``: the agent is about to suspend the node. The proxy answers with the node's
in-flight (relayed) connection count and whether it agrees (``allowed``); after it agrees it
holds new connections for the node instead of forwarding them to a dying backend.
``suspended``: the agent is running the suspend command now (its instances are stopped): the
proxy takes the node as asleep at once instead of waiting for probes to time out. A proxy that
does not know it answers 400, which the agent logs and ignores (probes still find out).
``resumed``: the node is back from sleep (its services may still be starting).
``ready``: the node's services are ready; held connections are released at once.

Both directions are plain JSON objects; ``decode_*`` validate every field and raise
``EventError`` with one line naming the field, so a malformed message never half-applies.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

from shared.errors import LlamanapError

EVENTS_PATH = "/v1/events"
EventKind = Literal["suspending", "resumed", "ready", "suspended"]
EVENT_KINDS: tuple[str, ...] = get_args(EventKind)
MAX_REASON_CHARS = 500  # reasons go into logs; a longer one is a bug on the sending side
MAX_NODE_CHARS = 100


class EventError(LlamanapError):
    """An event or reply message does not fit the schema (the sender's fault)."""


@dataclass(frozen=True)
class NodeEvent:
    """One message from a node's agent to the proxy."""

    event: EventKind
    node: str
    reason: str = ""

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()


@dataclass(frozen=True)
class EventReply:
    """The proxy's answer to any event. ``allowed`` is meaningful for ``suspending``; for
    ``resumed`` and ``ready`` it is always true."""

    node: str
    allowed: bool
    state: str
    in_flight: int
    held: int
    reason: str = ""

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()


def decode_event(data: bytes | str | Any) -> NodeEvent:
    """Parse and validate an event (raw JSON or an already-parsed object)."""
    obj = _parse(data)
    _only_keys(obj, {"event", "node", "reason"})
    kind = obj.get("event")
    if kind not in EVENT_KINDS:
        raise EventError(f"event: found {kind!r}; allowed: {', '.join(EVENT_KINDS)}")
    node = _string(obj, "node", required=True, limit=MAX_NODE_CHARS)
    reason = _string(obj, "reason", required=False, limit=MAX_REASON_CHARS)
    return NodeEvent(kind, node, reason)


def decode_reply(data: bytes | str | Any) -> EventReply:
    """Parse and validate the proxy's reply."""
    obj = _parse(data)
    _only_keys(obj, {"node", "allowed", "state", "in_flight", "held", "reason"})
    allowed = obj.get("allowed")
    if not isinstance(allowed, bool):
        raise EventError(f"allowed: found {allowed!r}; expected true or false")
    counts = []
    for key in ("in_flight", "held"):
        value = obj.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise EventError(f"{key}: found {value!r}; expected a count >= 0")
        counts.append(value)
    return EventReply(
        node=_string(obj, "node", required=True, limit=MAX_NODE_CHARS),
        allowed=allowed,
        state=_string(obj, "state", required=True, limit=MAX_NODE_CHARS),
        in_flight=counts[0],
        held=counts[1],
        reason=_string(obj, "reason", required=False, limit=MAX_REASON_CHARS),
    )


def _parse(data: bytes | str | Any) -> dict[str, Any]:
    if isinstance(data, bytes | str):
        try:
            data = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise EventError(f"not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise EventError(f"found {type(data).__name__}; expected a JSON object")
    return data


def _only_keys(obj: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise EventError(f"{unknown[0]}: unknown field; allowed: {', '.join(sorted(allowed))}")


def _string(obj: dict[str, Any], key: str, *, required: bool, limit: int) -> str:
    value = obj.get(key, None if required else "")
    if not isinstance(value, str) or (required and not value):
        raise EventError(f"{key}: found {value!r}; expected a non-empty string")
    if len(value) > limit:
        raise EventError(f"{key}: {len(value)} characters; at most {limit} allowed")
    return value
