"""Route by model across the backends behind one listener: pure decisions, no I/O.

A listener fronts one or more backends (in config order): a node and its ``backend_port``,
one per route, keyed by the node's name, or ``NODE:PORT`` where a node has several routes on
the listener (several instances behind one URL, ``backend_keys``). Each backend serves the
models its route names in config (``models = [...]``) plus those learned from its own
``GET /v1/models`` answers (or its node's agent, for the instance on its port). A request's
``model`` field chooses the backend; when several serve a model, one on an awake node is
preferred so that a sleeping box is not woken for nothing, then config order. With a single
backend the field is not checked: it serves whatever it serves.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

# Models listed from config only (never seen in a live answer) carry this owner.
CONFIG_OWNER: Final = "llamanap"
# POST endpoints (OpenAI's and llama-server's own) whose body is one JSON object that may name
# a ``model``: a body that is not one, or a ``model`` that is not a string, is refused by the
# proxy instead of waking a node only for llama-server to refuse it.
JSON_BODY_PATHS: Final = frozenset({
    "/v1/chat/completions", "/chat/completions", "/v1/completions", "/completions",
    "/completion", "/v1/embeddings", "/embeddings", "/embedding", "/infill",
    "/v1/rerank", "/rerank", "/v1/reranking", "/reranking", "/v1/messages",
})


@dataclass(frozen=True)
class Routed:
    """The request goes to backend ``node`` (a key of ``backend_keys``); ``model`` is the
    label to count it under."""

    node: str
    model: str


@dataclass(frozen=True)
class Unroutable:
    """No node can take the request: ``status`` and a message for an OpenAI-shaped error."""

    status: int
    message: str
    code: str


Decision = Routed | Unroutable


def backend_keys(backends: Sequence[tuple[str, int]]) -> list[str]:
    """The key of each (node, backend_port) behind one listener: the node's name, or
    ``NODE:PORT`` for a node with several routes there."""
    count = Counter(node for node, _ in backends)
    return [node if count[node] == 1 else f"{node}:{port}" for node, port in backends]


def model_ids(body: bytes) -> list[str]:
    """Model ids in a ``/v1/models`` answer (OpenAI ``data[].id``; Ollama ``models[].name``)."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return []
    if not isinstance(doc, dict):
        return []
    found: list[str] = []
    for key, id_key in (("data", "id"), ("models", "name")):
        items = doc.get(key)
        if isinstance(items, list):
            found += [i[id_key] for i in items if isinstance(i, dict) and isinstance(i.get(id_key), str)]
    return list(dict.fromkeys(found))


def body_problem(method: str, path: str, body: bytes) -> str | None:
    """Why a request to a JSON endpoint cannot be served, or None (any other request, or a
    JSON object whose ``model``, if given and not null, is a string)."""
    if method != "POST" or path not in JSON_BODY_PATHS:
        return None
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        return f"the body of POST {path} is not valid JSON ({exc}); send one JSON object"
    if not isinstance(doc, dict):
        return f"the body of POST {path} is a JSON {type(doc).__name__}; send one JSON object"
    model = doc.get("model")
    if model is not None and not isinstance(model, str):
        return f"'model' must be a string naming a model, not {json.dumps(model)[:40]}"
    return None


def requested_model(body: bytes) -> str | None:
    """The ``model`` field of a JSON request body, or None (no body, not JSON, no field)."""
    if not body or body[:1] not in (b"{", b" ", b"\n", b"\r", b"\t"):
        return None
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    model = doc.get("model") if isinstance(doc, dict) else None
    return model if isinstance(model, str) else None


def wants_stream(body: bytes) -> bool:
    """Whether a JSON request body asks for ``"stream": true`` (an SSE answer)."""
    if b'"stream"' not in body:
        return False
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(doc, dict) and doc.get("stream") is True


@dataclass
class ModelTable:
    """The models each backend behind one listener serves (keyed as ``backend_keys``), from
    config and from live answers."""

    nodes: tuple[str, ...]
    configured: Mapping[str, Sequence[str]] = field(default_factory=dict)
    learned: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"<ModelTable {', '.join(f'{n}={list(self.served_by(n))}' for n in self.nodes)}>"

    def learn(self, node: str, body: bytes) -> None:
        """Replace what ``node`` is known to serve with the ids in its ``/v1/models`` answer."""
        self.learn_ids(node, model_ids(body))

    def learn_ids(self, node: str, ids: Iterable[str]) -> None:
        """Replace what ``node`` is known to serve with ``ids`` (none: keep what it was)."""
        if ids := tuple(ids):
            self.learned[node] = ids

    def served_by(self, node: str) -> tuple[str, ...]:
        return tuple(dict.fromkeys([*self.configured.get(node, ()), *self.learned.get(node, ())]))

    def known(self) -> set[str]:
        return {m for node in self.nodes for m in self.served_by(node)}

    def route(self, model: str | None, is_awake: Callable[[str], bool]) -> Decision:
        """Which node serves a request for ``model`` (None: the request names no model)."""
        if len(self.nodes) == 1:
            node = self.nodes[0]
            return Routed(node, model if model in self.served_by(node) else "other")
        if model is None:
            return Routed(self.nodes[0], "none")
        candidates = [n for n in self.nodes if model in self.served_by(n)]
        if not candidates:
            known = ", ".join(sorted(self.known())) or "(none yet)"
            return Unroutable(404, f"The model '{model}' does not exist; models here: {known}",
                              "model_not_found")
        awake = [n for n in candidates if is_awake(n)]
        return Routed((awake or candidates)[0], model)

    def union(self, answers: Mapping[str, bytes | None]) -> dict[str, Any]:
        """One ``/v1/models`` list for all nodes: each node's own entries (from a live or
        cached answer) first, then config-only models; the first node to list an id wins."""
        data: list[dict[str, Any]] = []
        seen: set[str] = set()
        for node in self.nodes:
            for entry in _entries(answers.get(node)):
                if entry["id"] not in seen:
                    seen.add(entry["id"])
                    data.append(entry)
        for node in self.nodes:
            for model in self.configured.get(node, ()):
                if model not in seen:
                    seen.add(model)
                    data.append(config_entry(model))
        return {"object": "list", "data": data}


def config_entry(model: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": 0, "owned_by": CONFIG_OWNER}


def _entries(body: bytes | None) -> Iterable[dict[str, Any]]:
    if not body:
        return []
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return []
    items = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(items, list):
        return []
    return [i for i in items if isinstance(i, dict) and isinstance(i.get("id"), str)]
