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
``ready``: the node's services are ready; held connections are released at once. The agent
also sends ``models`` and ``ready`` when it starts, so a proxy that took the node for asleep
sees it come up by itself.
``unloading``: the agent is about to stop instances that serve models on demand (their TTL ran
out, they are evicted for another model, or an unload was asked for); ``unloading`` lists the
instance names. The proxy marks their models unloaded at once, so new requests for them wait
for a load instead of reaching an instance that is exiting; the agent stops them once the
proxy answered (or did not in time). A proxy that does not know the event answers 400, which
the agent logs (requests then find out by a refused connection and load the model again).
``models``: the node's model list changed (a reload, an instance enabled or disabled); nothing
else changes. Every event may carry ``models``, the ids the node serves (what its instances
list at ``GET /v1/models``), so the proxy can list them while the node sleeps. An event without
it says nothing about the models (older agents); a proxy that does not know the field or the
``models`` event answers 400, and the agent then sends its events without it.

``GET HELD_PATH`` (the same token) answers what the proxy holds for a node right now, so a
resuming agent starts those first: ``{"node": "gpubox", "models": ["qwen"], "ports": [8081]}``,
the models held requests named and the backend ports held connections wait for. A proxy
without the path answers 404; the agent then starts its instances in config order.

Both directions are plain JSON objects; ``decode_*`` validate every field and raise
``EventError`` with one line naming the field, so a malformed message never half-applies.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

from shared.errors import LlamanapError

EVENTS_PATH = "/v1/events"
HELD_PATH = "/v1/nodes/{node}/held"
EventKind = Literal["suspending", "resumed", "ready", "suspended", "models", "unloading"]
EVENT_KINDS: tuple[str, ...] = get_args(EventKind)
MAX_REASON_CHARS = 500  # reasons go into logs; a longer one is a bug on the sending side
MAX_NODE_CHARS = 100
# A node serves a handful of models; a list this long is a bug, and the proxy keeps it on disk.
MAX_MODELS = 256
MAX_MODEL_ID_CHARS = 512  # ids are names or file paths (llama-server without --alias)


class EventError(LlamanapError):
    """An event or reply message does not fit the schema (the sender's fault)."""


@dataclass(frozen=True)
class NodeEvent:
    """One message from a node's agent to the proxy."""

    event: EventKind
    node: str
    reason: str = ""
    models: tuple[str, ...] | None = None  # None: not said (the field is left out)
    unloading: tuple[str, ...] | None = None  # instance names, in an ``unloading`` event

    def encode(self) -> bytes:
        obj: dict[str, Any] = {"event": self.event, "node": self.node, "reason": self.reason}
        if self.models is not None:
            obj["models"] = list(self.models)
        if self.unloading is not None:
            obj["unloading"] = list(self.unloading)
        return json.dumps(obj).encode()


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
    _only_keys(obj, {"event", "node", "reason", "models", "unloading"})
    kind = obj.get("event")
    if kind not in EVENT_KINDS:
        raise EventError(f"event: found {kind!r}; allowed: {', '.join(EVENT_KINDS)}")
    node = _string(obj, "node", required=True, limit=MAX_NODE_CHARS)
    reason = _string(obj, "reason", required=False, limit=MAX_REASON_CHARS)
    models = None if obj.get("models") is None else check_models(obj["models"])
    if kind == "models" and models is None:
        raise EventError("models: missing; a models event lists the node's model ids")
    unloading = None if obj.get("unloading") is None else check_models(obj["unloading"],
                                                                         "unloading")
    if (kind == "unloading") != (unloading is not None):
        raise EventError("unloading: an unloading event, and only one, lists the instances "
                         "about to stop")
    return NodeEvent(kind, node, reason, models, unloading)


def check_models(value: Any, where: str = "models") -> tuple[str, ...]:
    """A list of distinct, non-empty model ids within the bounds; raises ``EventError``."""
    if not isinstance(value, list | tuple):
        raise EventError(f"{where}: found {type(value).__name__}; expected a list of model ids")
    if len(value) > MAX_MODELS:
        raise EventError(f"{where}: {len(value)} ids; at most {MAX_MODELS} allowed")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item or not item.isprintable():
            raise EventError(f"{where}[{i}]: found {item!r}; expected a non-empty one-line string")
        if len(item) > MAX_MODEL_ID_CHARS:
            raise EventError(f"{where}[{i}]: {len(item)} characters; at most "
                             f"{MAX_MODEL_ID_CHARS} allowed")
    return tuple(dict.fromkeys(value))


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


@dataclass(frozen=True)
class HeldWork:
    """What the proxy holds for one node: the models held requests asked for, and the
    backend ports held connections wait for (both without repeats, most held first)."""

    node: str
    models: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()

    def encode(self) -> bytes:
        return json.dumps({"node": self.node, "models": list(self.models),
                           "ports": list(self.ports)}).encode()


def decode_held(data: bytes | str | Any) -> HeldWork:
    """Parse and validate the proxy's answer at ``HELD_PATH``."""
    obj = _parse(data)
    _only_keys(obj, {"node", "models", "ports"})
    ports = obj.get("ports", [])
    if not isinstance(ports, list) or not all(
            isinstance(p, int) and not isinstance(p, bool) and 0 < p < 65536 for p in ports):
        raise EventError(f"ports: found {ports!r:.100}; expected a list of TCP ports")
    return HeldWork(_string(obj, "node", required=True, limit=MAX_NODE_CHARS),
                    check_models(obj.get("models", [])), tuple(dict.fromkeys(ports)))


def parse_object(data: bytes | str | Any, error: type[LlamanapError]) -> dict[str, Any]:
    """Raw JSON (or an already-parsed value) as a JSON object; ``error`` with one line if not."""
    if isinstance(data, bytes | str):
        try:
            data = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise error(f"not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise error(f"found {type(data).__name__}; expected a JSON object")
    return data


def _parse(data: bytes | str | Any) -> dict[str, Any]:
    return parse_object(data, EventError)


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
