"""What each node serves, as the proxy learned it, kept on disk across proxy restarts.

A frontend that gets an empty model list cannot send a request, so nothing would ever wake
the box. The proxy therefore always keeps, per node, the model ids its agent last reported
(events carry them, see ``shared.events``) and the last good ``GET /v1/models`` answer it
saw, and writes both to ``STATE_FILE`` under ``state_dir`` whenever they change: written
atomically (a temp file, fsync, rename), so a crash leaves the old file or the new one. A
file that cannot be read is a logged warning and an empty start, never a crash.

``model_list(node, configured)`` builds the OpenAI-shaped list from all of it (the newer of the
agent's report and the last answer decides which ids are listed; config adds its own).
Writes are rare (only when what a node serves changes) and the file is small, so they run
on the caller's thread.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

from edge_proxy.http_routes.models import config_entry, model_ids
from shared.events import EventError, check_models

log = logging.getLogger(__name__)

STATE_FILE: Final = "models.json"
STATE_VERSION: Final = 1
# A model list answer is a few KiB; one bigger than this is not kept on disk.
MAX_ANSWER_BYTES: Final = 256 * 1024


@dataclass(frozen=True)
class NodeModels:
    """One node's models: the agent's report and the last answer, with when each was seen
    (wall clock, seconds: the file outlives the process and its monotonic clock)."""

    agent: tuple[str, ...] | None = None
    agent_at: float = 0.0
    answer: bytes | None = None  # the body of the last 200 answer to GET /v1/models
    answer_at: float = 0.0

    @functools.cached_property  # routing asks on every request; the answer is parsed once
    def ids(self) -> tuple[str, ...]:
        """Every id the node is known to serve. An agent's report newer than the last answer
        is the whole truth (it names what the node runs now); else the answer's ids first."""
        if self.agent is not None and self.agent_at >= self.answer_at:
            return self.agent
        answer = tuple(model_ids(self.answer)) if self.answer else ()
        return tuple(dict.fromkeys((*answer, *(self.agent or ()))))


class ModelKnowledge:
    """Per node, what it serves; one owner (the proxy), read by the routes and the control
    endpoint. ``state_dir`` None: kept in memory only."""

    def __init__(self, state_dir: Path | None, *, wall: Callable[[], float] = time.time) -> None:
        self.path = None if state_dir is None else state_dir / STATE_FILE
        self._wall = wall
        self._nodes: dict[str, NodeModels] = {}
        if self.path is not None:
            self._nodes = _load(self.path)

    def __repr__(self) -> str:
        return f"<ModelKnowledge {self.path} {dict((n, list(m.ids)) for n, m in self._nodes.items())}>"

    def get(self, node: str) -> NodeModels:
        return self._nodes.get(node, NodeModels())

    def ids(self, node: str) -> tuple[str, ...]:
        return self.get(node).ids

    def knows(self, node: str) -> bool:
        return bool(self.ids(node))

    def from_agent(self, node: str, models: Iterable[str]) -> None:
        """The node's agent listed its models (with an event)."""
        ids = tuple(models)
        current = self.get(node)
        if current.agent == ids:
            return
        log.info("node %s: its agent lists %s", node, ", ".join(ids) or "no models")
        self._set(node, replace(current, agent=ids, agent_at=self._wall()))

    def from_answer(self, node: str, body: bytes) -> None:
        """A good ``GET /v1/models`` answer of the node (one without model ids is ignored)."""
        current = self.get(node)
        if not model_ids(body) or len(body) > MAX_ANSWER_BYTES or current.answer == body:
            return
        self._set(node, replace(current, answer=body, answer_at=self._wall()))

    def model_list(self, node: str, configured: Iterable[str]) -> dict[str, Any] | None:
        """An OpenAI-shaped ``/v1/models`` list of what ``node`` serves; None if nothing is
        known (no config, no report, no answer: an agent that reports no models is known to
        serve none). Entries of the last answer are kept as the node sent them; other ids get
        the proxy's own entry."""
        known = self.get(node)
        configured = tuple(dict.fromkeys(configured))
        if known.agent is None and known.answer is None and not configured:
            return None
        entries = _entries(known.answer)
        data = [entries.get(i) or config_entry(i) for i in known.ids]
        listed = {d["id"] for d in data}
        data += [config_entry(m) for m in configured if m not in listed]
        return {"object": "list", "data": data}

    def _set(self, node: str, models: NodeModels) -> None:
        self._nodes[node] = models
        if self.path is not None:
            _save(self.path, self._nodes)


def _entries(body: bytes | None) -> dict[str, dict[str, Any]]:
    if not body:
        return {}
    try:
        items = json.loads(body).get("data")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return {}
    if not isinstance(items, list):
        return {}
    return {i["id"]: i for i in items if isinstance(i, dict) and isinstance(i.get("id"), str)}


def _save(path: Path, nodes: dict[str, NodeModels]) -> None:
    doc = {"version": STATE_VERSION, "nodes": {
        name: {"agent": None if m.agent is None else list(m.agent), "agent_at": m.agent_at,
               "answer": None if m.answer is None else m.answer.decode("utf-8", "replace"),
               "answer_at": m.answer_at}
        for name, m in sorted(nodes.items())}}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(doc, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a power cut
        finally:
            os.close(dir_fd)
    except OSError as exc:
        # Knowing the models matters, but not more than relaying: keep them in memory.
        log.warning("%s: cannot save what the nodes serve (%s); check state_dir and its "
                    "permissions", path, exc.strerror or exc)


def _load(path: Path) -> dict[str, NodeModels]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("%s: cannot read (%s); starting without the saved model lists", path, exc)
        return {}
    try:
        return _parse(json.loads(text))
    except (ValueError, EventError, TypeError, KeyError) as exc:
        log.warning("%s: not a model state file (%s); starting without the saved model lists "
                    "(the file is rewritten when a node reports its models)", path, exc)
        return {}


def _parse(doc: Any) -> dict[str, NodeModels]:
    if not isinstance(doc, dict) or doc.get("version") != STATE_VERSION:
        raise ValueError(f"expected an object with version {STATE_VERSION}")
    nodes: dict[str, NodeModels] = {}
    for name, entry in dict(doc["nodes"]).items():
        agent = entry.get("agent")
        answer = entry.get("answer")
        if answer is not None and not isinstance(answer, str):
            raise ValueError(f"nodes.{name}.answer: expected a string")
        nodes[str(name)] = NodeModels(
            agent=None if agent is None else check_models(agent, f"nodes.{name}.agent"),
            agent_at=float(entry.get("agent_at", 0.0)),
            answer=None if answer is None else answer.encode(),
            answer_at=float(entry.get("answer_at", 0.0)))
    return nodes
