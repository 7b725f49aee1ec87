"""What one listener knows of its backends' models: the routing table, and the answer to a
model list that spans several backends.

The table (``models.ModelTable``) routes by a request's ``model``. Per backend key it is
filled from the route's own ``models``, from what the proxy knows (``ModelKnowledge``: the
agents' reports, answers kept across a restart), from each node's own ``/v1/models`` answer
(fetched when it wakes, or relayed and cached), and, for a node with an agent, from every
model the agent listed, loaded or not (its ``ModelGate``). ``GET /v1/models`` on a listener
with several backends, or in front of an agent's list, is answered with the union: live from
awake nodes, else the last answer seen, else what the proxy knows; never a wake.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Final

import trio

from edge_proxy.errors import BackendUnavailable, UpstreamError
from edge_proxy.http_routes.backend import NodeBackend
from edge_proxy.http_routes.cache import MAX_CACHED_BODY_BYTES, cache_key
from edge_proxy.http_routes.exchange import Exchange
from edge_proxy.http_routes.headers import RawHeaders, response_headers
from edge_proxy.http_routes.knowledge import ModelKnowledge
from edge_proxy.http_routes.models import ModelTable
from edge_proxy.http_routes.poll_answers import PollAnswers
from edge_proxy.http_routes.upstream import read_capped
from edge_proxy.loading import ModelGate

log = logging.getLogger(__name__)

# The model-list union asks each awake node live; one slow node must not stall the page.
MODELS_FETCH_TIMEOUT_S: Final = 5.0
MODEL_LIST_KEY: Final = cache_key("GET", "/v1/models", b"")


class ModelLists:
    """The listener's model table and its model-list answers. ``configure`` takes the
    (reloaded) backends; what was learned about the backends that stay is kept."""

    def __init__(self, listen: str, knowledge: ModelKnowledge, answers: PollAnswers,
                 gates: Mapping[str, ModelGate]) -> None:
        self.listen = listen
        self.knowledge = knowledge
        self.answers = answers
        self.gates = gates
        self.backends: dict[str, NodeBackend] = {}
        self.table = ModelTable(())

    def __repr__(self) -> str:
        return f"<ModelLists {self.listen} {self.table!r}>"

    def configure(self, backends: Mapping[str, NodeBackend]) -> None:
        self.backends = dict(backends)
        learned = {k: ids for k, ids in self.table.learned.items() if k in self.backends}
        self.table = ModelTable(tuple(self.backends),
                                {k: tuple(b.route.models) for k, b in self.backends.items()},
                                learned)
        self.sync_learned()

    def sync_learned(self) -> None:
        """Route by what the proxy knows too (the agent's reports, answers before a restart),
        per backend key: a node with several ports here has its answers per port."""
        for key in self.backends:
            if ids := self.knowledge.ids(key):
                self.table.learned[key] = tuple(dict.fromkeys(
                    (*ids, *self.table.learned.get(key, ()))))

    def learn_from_agents(self) -> None:
        """Every model a node's agent listed, loaded or not, is one this listener serves (on
        the backend whose port its instance listens on, where a node has several here)."""
        for key, backend in self.backends.items():
            gate = self.gates.get(backend.name)
            if gate is not None and gate.table.models:
                listed = gate.table.openai_list(backend.agent_port())
                self.table.learn_ids(key, (m["id"] for m in listed["data"]))

    def answers_as_union(self) -> bool:
        """A model list here is the union (several backends, or an agent's list)."""
        return len(self.backends) > 1 or any(
            b.name in self.gates and self.gates[b.name].table.models
            for b in self.backends.values())

    async def answer_union(self, ex: Exchange, refresh_s: float) -> None:
        answers: dict[str, bytes | None] = {}

        async def fetch(backend: NodeBackend) -> None:
            gate = self.gates.get(backend.name)
            if gate is not None and gate.table.models:  # the agent's list has them all
                listed = gate.table.openai_list(backend.agent_port())
                answers[backend.key] = json.dumps(listed).encode()
                return
            if self.answers.goes_through(backend, MODEL_LIST_KEY, refresh_s):
                with trio.move_on_after(MODELS_FETCH_TIMEOUT_S):
                    answers[backend.key] = await self.fetch(backend)
            if answers.get(backend.key) is None:
                answers[backend.key] = self.answers.known_models(backend.key, MODEL_LIST_KEY)

        async with trio.open_nursery() as nursery:
            for backend in self.backends.values():
                nursery.start_soon(fetch, backend)
        body = json.dumps(self.table.union(answers)).encode()
        await ex.respond(200, [(b"content-type", b"application/json")], body)

    async def fetch(self, backend: NodeBackend) -> bytes | None:
        """``GET /v1/models`` from an awake node: cached and learned from; None on failure."""
        driver = backend.driver
        try:
            async with backend.upstream.exchange(driver.cfg.host, "GET", b"/v1/models",
                                                 [(b"accept", b"application/json")], b"",
                                                 driver.cfg.probe_timeout_s,
                                                 backend.route.upstream_idle_timeout_s
                                                 ) as response:
                body = await read_capped(response, MAX_CACHED_BODY_BYTES)
                status, raw = response.status, response.headers
        except (BackendUnavailable, UpstreamError) as exc:
            log.info("route %s: model list of %s not fetched: %s", self.listen, backend.name, exc)
            return None
        if status != 200 or body is None:
            return None
        self.remember(backend, "GET", "/v1/models", MODEL_LIST_KEY, status,
                      response_headers([(name.lower(), value) for name, value in raw]), body)
        return body

    def remember(self, backend: NodeBackend, method: str, path: str, key: str, status: int,
                 headers: RawHeaders, body: bytes) -> None:
        """A good poll answer: cached, and learned from when it is a model list."""
        if self.answers.remember(backend.key, method, path, key, status, headers, body):
            self.table.learn(backend.key, body)
