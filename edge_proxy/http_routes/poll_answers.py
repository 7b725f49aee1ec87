"""The proxy's own answers to no-wake polls, for one listener: the last good answer (the
cache), a model list from what the proxy knows (``knowledge``), or a 503 that also wakes a
node nobody knows anything about, once, so it is known next time (``learn_models_wake``).

Answers, the poll gate and the knowledge are per backend key (``models.backend_keys``): the
node's name, or NODE:PORT for a node with several ports on the listener, whose ports serve
different models. Metrics, headers and messages name the node."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Final

import trio

from edge_proxy.http_routes.cache import CACHED_FROM_HEADER, ResponseCache
from edge_proxy.http_routes.exchange import Exchange
from edge_proxy.http_routes.headers import RawHeaders
from edge_proxy.http_routes.knowledge import ModelKnowledge
from edge_proxy.http_routes.metrics import HttpMetrics
from edge_proxy.http_routes.polls import MODELS_SOURCE_HEADER, PollGate, sources

if TYPE_CHECKING:
    from edge_proxy.http_routes.backend import NodeBackend

log = logging.getLogger(__name__)

MODEL_LIST_PATHS: Final = frozenset({"/v1/models", "/models"})
# Polls answered 503 while the node sleeps and nothing is cached: come back in this long.
NO_CACHE_RETRY_AFTER_S: Final = 30


class PollAnswers:
    """Owns the listener's poll cache, its poll gate and the nodes woken to learn."""

    def __init__(self, listen: str, metrics: HttpMetrics, knowledge: ModelKnowledge,
                 cache: ResponseCache | None = None) -> None:
        self.listen = listen
        self.metrics = metrics
        self.knowledge = knowledge
        self.cache = cache or ResponseCache()
        self.gate = PollGate()
        self._learn_woken: set[str] = set()

    def __repr__(self) -> str:
        return f"<PollAnswers {self.listen} {self.cache!r} learn_woken={sorted(self._learn_woken)}>"

    def goes_through(self, backend: NodeBackend, key: str, refresh_s: float) -> bool:
        """Whether this poll is relayed to the node: it is awake, and nothing was cached or
        the last poll for ``key`` went through ``refresh_s`` ago or more."""
        cached = self.cache.lookup(backend.key, key) is not None
        return backend.is_awake() and self.gate.claim(backend.key, key, trio.current_time(),
                                                      refresh_s, cached=cached)

    def remember(self, backend_key: str, method: str, path: str, key: str, status: int,
                 headers: RawHeaders, body: bytes) -> bool:
        """Keep a good answer; True when it was the backend's model list."""
        self.cache.store(backend_key, key, status, headers, body, trio.current_time())
        if status == 200 and method == "GET" and path in MODEL_LIST_PATHS:
            self.knowledge.from_answer(backend_key, body)
            return True
        return False

    def known_models(self, backend_key: str, key: str) -> bytes | None:
        """The backend's model list for the union: the cached answer, else what is known."""
        cached = self.cache.lookup(backend_key, key)
        if cached is not None:
            return cached.body
        listed = self.knowledge.model_list(backend_key, ())
        return None if listed is None else json.dumps(listed).encode()

    async def answer(self, ex: Exchange, backend: NodeBackend, key: str) -> None:
        """Answer a poll without the node: cached, a known model list, else 503."""
        node, now = backend.name, trio.current_time()
        cached = self.cache.lookup(backend.key, key)
        if cached is not None:
            self.metrics.no_wake.labels(self.listen, node, "cache").inc()
            ex.outcome("cache")
            await ex.respond(cached.status, cached.replay_headers(node, now), cached.body)
            return
        if ex.path in MODEL_LIST_PATHS:
            listed = self.knowledge.model_list(backend.key, backend.route.models)
            if listed is not None:
                known = self.knowledge.get(backend.key)
                self.metrics.no_wake.labels(self.listen, node, "config").inc()
                ex.outcome("cache")  # answered by the proxy from what it knows
                await ex.respond(200, [
                    (b"content-type", b"application/json"), (CACHED_FROM_HEADER, node.encode()),
                    (MODELS_SOURCE_HEADER, sources(bool(known.agent), known.answer is not None,
                                                   bool(backend.route.models)))],
                    json.dumps(listed).encode())
                return
            self._learn(backend)
        self.metrics.no_wake.labels(self.listen, node, "unavailable").inc()
        ex.outcome("refused")
        await ex.fail(503, f"node {node} is {backend.driver.state.name.lower()} and no answer to "
                      f"{ex.method} {ex.path} has been seen yet; this request does not wake it",
                      "service_unavailable",
                      headers=[(b"retry-after", str(NO_CACHE_RETRY_AFTER_S).encode())])

    def _learn(self, backend: NodeBackend) -> None:
        """Nothing tells what the node serves: wake it once (``learn_models_wake``), so the
        listener's learner reads its ``/v1/models`` when it is up."""
        if backend.is_awake() or backend.name in self._learn_woken \
                or not backend.driver.cfg.learn_models_wake:
            return
        self._learn_woken.add(backend.name)
        log.info("route %s: nothing tells what node %s serves; waking it once to learn "
                 "(nodes.%s.learn_models_wake)", self.listen, backend.name, backend.name)
        backend.driver.wake_now("to learn the models it serves")
