"""The route of one HTTP-aware listener: decide per request, then relay it as it streams.

Per request, in order:

0. ``intake.read_request`` reads the whole body and refuses, counted, what no node should
   see (an unknown HTTP version, ambiguous framing, a body too large, too slow or not JSON).
1. ``GET /v1/models`` (or ``/models``) on a listener with several nodes, or in front of an
   agent's list of models on demand: the union of every node's list (``model_lists``),
   never a wake.
2. The ``model`` field picks the backend, a node and port (``ModelTable.route``); an unknown
   model is a 404.
3. A request matching a no-wake rule goes to an AWAKE node once per ``poll_refresh_s`` (per
   path; ``polls.PollGate``) and its good answer is cached; otherwise, and to any other node,
   it is answered from the cache, a model list from what the proxy knows (``knowledge``), and
   only a node the proxy knows nothing about answers 503 + ``Retry-After`` (and is woken once
   to learn its models, ``learn_models_wake``).
4. Any other request goes to an AWAKE node at once, else it is held while the node's one
   shared wake runs (streaming ones get SSE comments meanwhile), then sent; a wake that times
   out is a 504 in OpenAI's error shape.

Responses are relayed as the backend sends them: a chunked one (SSE streams) passed through
as it was framed (``passthrough``), others chunk by chunk; only poll answers for the cache
are also kept, up to ``MAX_CACHED_BODY_BYTES``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import partial

import trio

from edge_proxy.admission import (
    Admission,
    Connected,
    ConnectionCounts,
    GaveUp,
    Hold,
    NotLoaded,
    NotWoken,
    Refused,
)
from edge_proxy.errors import (
    BackendUnavailable,
    ClientLeft,
    UpstreamClosedEarly,
    UpstreamError,
    UpstreamTimeout,
)
from edge_proxy.history.hooks import RequestLog
from edge_proxy.history.store import Recorder
from edge_proxy.http_routes import waking
from edge_proxy.http_routes.backend import NodeBackend
from edge_proxy.http_routes.cache import MAX_CACHED_BODY_BYTES, ResponseCache, cache_key
from edge_proxy.http_routes.exchange import Exchange
from edge_proxy.http_routes.headers import header, request_headers, response_headers
from edge_proxy.http_routes.intake import read_request
from edge_proxy.http_routes.knowledge import ModelKnowledge
from edge_proxy.http_routes.metrics import HttpMetrics, Refusals
from edge_proxy.http_routes.model_lists import ModelLists
from edge_proxy.http_routes.models import Unroutable, requested_model, wants_stream
from edge_proxy.http_routes.passthrough import pass_through, passable
from edge_proxy.http_routes.poll_answers import (
    MODEL_LIST_PATHS,
    NO_CACHE_RETRY_AFTER_S,
    PollAnswers,
)
from edge_proxy.http_routes.rules import WakePolicy
from edge_proxy.loading import ModelGate, ModelNeed
from edge_proxy.tcp_routes.relay_loop import RelayLoop
from edge_proxy.wake.machine import Event, State
from shared.config.edge import HttpOptions
from shared.h1 import Client, Scope

log = logging.getLogger(__name__)

class HttpRouteApp:
    """Serves one listener. Every decision is made by the pure parts (rules, cache, models)."""

    def __init__(self, listen: str, backends: list[NodeBackend], options: HttpOptions,
                 counts: ConnectionCounts, metrics: HttpMetrics, knowledge: ModelKnowledge,
                 cache: ResponseCache | None = None, recorder: Recorder | None = None,
                 gates: Mapping[str, ModelGate] | None = None,
                 relay_loop: RelayLoop | None = None) -> None:
        self.listen = listen
        self.relay_loop = relay_loop  # passes streamed answers on (None: trio does)
        self.recorder = recorder  # None: no history rows
        self.gates = gates or {}  # nodes with an agent: their models on demand (the proxy's)
        self.counts = counts
        self.knowledge = knowledge
        self.answers = PollAnswers(listen, metrics, knowledge, cache)
        self.metrics = metrics
        self.refusals = Refusals(listen, metrics)
        self.live: set[Exchange] = set()  # requests in flight (``in_flight``)
        self.models = ModelLists(listen, knowledge, self.answers, self.gates)
        self.configure(backends, options)

    def configure(self, backends: list[NodeBackend], options: HttpOptions) -> None:
        """Take the listener's (reloaded) backends and options; what was learned about the
        backends that stay is kept. Requests already running finish with what they started
        with."""
        self.backends = {b.key: b for b in backends}
        self.options = options
        self.policy = WakePolicy.from_texts(options.no_wake)
        self.models.configure(self.backends)

    def __repr__(self) -> str:
        return f"<HttpRouteApp {self.listen} {self.models.table!r}>"

    async def handle(self, scope: Scope, client: Client) -> None:
        """Serve one request (``h1.H1Server``'s handler)."""
        row = None if self.recorder is None else RequestLog(
            self.recorder, self.listen, scope["method"], scope["path"],
            clock=trio.current_time, wall=time.time)
        await self._serve(Exchange(scope, client, row))

    async def _serve(self, ex: Exchange) -> None:
        # Counted with the proxy's open connections, so a graceful stop waits for it too.
        self.counts.opened()
        self.live.add(ex)
        try:
            await self._serve_counted(ex)
        except ClientLeft as exc:  # a write to it failed before any nursery (a refusal)
            log.info("route %s: client left during %s %s: %s", self.listen, ex.method,
                     ex.path, exc)
        finally:
            self.live.discard(ex)
            self.counts.closed()
            if ex.log is not None:
                ex.log.finish(client_left=not ex.finished)

    def in_flight(self) -> dict[str, int]:
        """Requests in flight per backend key (``""``: not routed yet)."""
        return dict(Counter(ex.backend for ex in self.live))

    async def _serve_counted(self, ex: Exchange) -> None:
        body = await read_request(ex, self.options, self.refusals, self.listen)
        if body is None:  # answered already: refused, or the client left
            if ex.finished:
                ex.outcome("refused")
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_disconnect, ex, nursery.cancel_scope)
            try:
                await self._dispatch_answering_errors(ex, body)
            except ClientLeft as exc:  # a write to it failed (its leaving may cancel first)
                log.info("route %s: client left during %s %s: %s", self.listen, ex.method,
                         ex.path, exc)
            nursery.cancel_scope.cancel()

    async def _dispatch_answering_errors(self, ex: Exchange, body: bytes) -> None:
        try:
            await self._dispatch(ex, body)
        except UpstreamError as exc:
            log.warning("route %s: %s %s: %s", self.listen, ex.method, ex.path, exc)
            # Once started, the answer is left unfinished: the server then closes the
            # connection without the last chunk, so a cut stream never looks complete.
            if isinstance(exc, UpstreamTimeout) and not ex.started:
                await ex.fail(504, f"the backend timed out: {exc}", "upstream_timeout")
            elif not ex.started:
                await ex.fail(502, f"the backend failed: {exc}", "upstream_error")

    async def _watch_disconnect(self, ex: Exchange, scope: trio.CancelScope) -> None:
        await ex.wait_gone()
        if not ex.complete():
            log.info("route %s: client left during %s %s", self.listen, ex.method, ex.path)
            scope.cancel()

    async def _dispatch(self, ex: Exchange, body: bytes) -> None:
        self.models.learn_from_agents()
        if ex.method == "GET" and ex.path in MODEL_LIST_PATHS and self.models.answers_as_union():
            await self.models.answer_union(ex, self.options.poll_refresh_s)
            return
        self.models.sync_learned()
        asked = requested_model(body)
        decision = self.models.table.route(asked, lambda n: self.backends[n].is_awake())
        if isinstance(decision, Unroutable):
            self.metrics.unknown_model.labels(self.listen).inc()
            ex.outcome("refused")
            await ex.fail(decision.status, decision.message, "invalid_request_error",
                          code=decision.code)
            return
        backend = self.backends[decision.node]
        ex.routed_to(backend.name, decision.model, backend.key)
        preflight = header(ex.scope["headers"], b"access-control-request-method")
        if self.policy.may_wake(ex.method, ex.path,
                                preflight.decode("latin-1") if preflight else None):
            gate = self.gates.get(backend.name)
            await self._forward_waking(ex, backend, decision.model, body,
                                       gate.need(asked) if gate is not None else None)
        else:
            await self._forward_no_wake(ex, backend, body)

    # ---- polls: never wake ---------------------------------------------------------------

    async def _forward_no_wake(self, ex: Exchange, backend: NodeBackend, body: bytes) -> None:
        key = cache_key(ex.method, ex.path, ex.query)
        if self.answers.goes_through(backend, key, self.options.poll_refresh_s):
            try:
                await self._relay(ex, backend, body, keep_as=key)
                self._count(ex, backend, "relayed")
                return
            except BackendUnavailable as exc:
                # Not reported to the driver: that would start a wake, which polls must not.
                log.info("route %s: poll %s %s not relayed: %s", self.listen, ex.method,
                         ex.path, exc.reason)
        await self.answers.answer(ex, backend, key)

    # ---- everything else: wake when needed -----------------------------------------------

    async def _forward_waking(self, ex: Exchange, backend: NodeBackend, model: str,
                              body: bytes, need: ModelNeed | None = None) -> None:
        driver = backend.driver
        admission = Admission(driver, backend.route.backend_port, self.counts, self.listen,
                              need)
        outcome = await admission.connect(
            partial(self._relay, ex, backend, body, closed_is_gone=need is not None),
            holding=partial(self._count_hold, ex, backend, model),
            while_held=partial(self._comment_while_held, ex, backend, need)
            if wants_stream(body) else None)
        if isinstance(outcome, Connected):
            self._count(ex, backend, "relayed")
        elif isinstance(outcome, Refused):
            self._count(ex, backend, "refused")
            ex.outcome("refused")
            self.refusals.refused("held_limit", f"{ex.method} {ex.path}: node "
                                  f"{backend.name} holds {driver.held} (max_held "
                                  f"{driver.cfg.max_held}, limits.max_held_total "
                                  f"{self.counts.limits.max_held_total})")
            await ex.fail(503, f"too many requests held for node {backend.name}",
                          "service_unavailable",
                          headers=[(b"retry-after", str(NO_CACHE_RETRY_AFTER_S).encode())])
        elif isinstance(outcome, NotWoken):
            self._count(ex, backend, "wake_timeout")
            ex.outcome("timeout")
            log.warning("route %s: %s %s: wake of %s failed: %s", self.listen, ex.method,
                        ex.path, backend.name, outcome.reason)
            await ex.fail(504, f"node {backend.name} did not wake: {outcome.reason}",
                          "wake_timeout")
        elif isinstance(outcome, NotLoaded):
            self._count(ex, backend, "load_failed")
            ex.outcome("load_failed")
            log.warning("route %s: %s %s: model %s on %s did not load: %s", self.listen,
                        ex.method, ex.path, outcome.model, backend.name, outcome.reason)
            await ex.fail(503, f"model {outcome.model} on node {backend.name} did not load: "
                          f"{outcome.reason}", "model_load_failed", code="model_not_loaded")
        elif isinstance(outcome, GaveUp):
            self._count(ex, backend, "gave_up")
            await ex.fail(502, f"node {backend.name} kept refusing after {outcome.attempts} "
                          "connect attempts", "upstream_error")
        # LeftWhileHeld: only a while_held hook reports it, and the comments never do (a
        # client that leaves cancels the whole request instead)

    @contextmanager
    def _count_hold(self, ex: Exchange, backend: NodeBackend, model: str) -> Iterator[None]:
        if backend.driver.state is not State.WAKING and not backend.driver.cooling_down():
            self.metrics.wakes.labels(self.listen, backend.name, model).inc()
        self.metrics.held.labels(self.listen, backend.name, model).inc()
        if ex.log is not None:
            ex.log.hold_started(waking=not backend.is_awake())
        try:
            yield
        finally:
            if ex.log is not None:
                ex.log.hold_ended()

    async def _comment_while_held(self, ex: Exchange, backend: NodeBackend,
                                  need: ModelNeed | None, hold: Hold) -> str | None:
        """SSE comments every ``waking_comment_interval_s`` until the hold ends (the first one
        starts the answer): ``: waking NODE``, then ``: loading MODEL`` once the node is up;
        a comment being sent when it ends is finished first."""
        started = trio.current_time()
        while True:
            await trio.sleep(self.options.waking_comment_interval_s)
            with hold.uninterrupted():
                if not ex.started:
                    await ex.start(200, list(waking.SSE_HEADERS))
                waited = trio.current_time() - started
                if need is not None and backend.is_awake():
                    await ex.body(waking.loading_comment(need.model, waited))
                else:
                    await ex.body(waking.comment(backend.name, waited))

    # ---- relaying ------------------------------------------------------------------------

    async def _relay(self, ex: Exchange, backend: NodeBackend, body: bytes,
                     keep_as: str | None = None, closed_is_gone: bool = False) -> None:
        """Send the request to the node and the answer to the client as it arrives. Raises
        ``BackendUnavailable`` (nothing sent yet) or ``UpstreamError``. ``keep_as``: the
        cache key under which a good answer is remembered. ``closed_is_gone``: a model on
        demand, whose instance closing the connection without a byte of its answer is an
        instance that was stopping (its TTL, an eviction): ``BackendUnavailable``, so the
        admission has it loaded again and sends the request once more."""
        try:
            await self._relay_once(ex, backend, body, keep_as)
        except UpstreamClosedEarly as exc:
            if not closed_is_gone:  # (nothing of the answer went out: no head had come)
                raise
            log.info("route %s: %s %s: %s; its instance was stopping: loading it again",
                     self.listen, ex.method, ex.path, exc)
            raise BackendUnavailable(Event.PROBE_REFUSED, str(exc)) from exc

    async def _relay_once(self, ex: Exchange, backend: NodeBackend, body: bytes,
                          keep_as: str | None) -> None:
        driver = backend.driver
        client = ex.scope.get("client")
        host = header(ex.scope["headers"], b"host")
        headers = request_headers(list(ex.scope["headers"]), client[0] if client else None,
                                  host, ex.scope.get("scheme", "http"))
        driver.active += 1
        # Polls (kept for the cache) are not model work: only the rest is timed per model.
        meter = None if keep_as else self.metrics.models.meter(
            backend.name, ex.model, streamed=wants_stream(body))
        try:
            async with backend.upstream.exchange(driver.cfg.host, ex.method, ex.target, headers,
                                                 body, driver.cfg.probe_timeout_s,
                                                 backend.route.upstream_idle_timeout_s
                                                 ) as response:
                out = response_headers(_lower(response.headers))
                if keep_as is None and passable(ex, response, out):
                    await pass_through(ex, response, out, meter, self.relay_loop,
                                       backend.route.upstream_idle_timeout_s)
                    return
                # With history on, the request's row reads llama-server's numbers from the
                # same chunks on their way to the client: the meter takes them from there.
                chunks = response.aiter_stream() if meter is None else meter.watch(
                    response.status, header(out, b"content-type"), response.aiter_stream(),
                    None if ex.log is None else ex.log.numbers)
                if ex.started:  # SSE comments went out while the node woke
                    await waking.continue_after_comments(ex, response, chunks)
                    return
                await ex.start(response.status, out)
                kept: list[bytes] | None = [] if keep_as and response.status == 200 else None
                size = 0
                async for chunk in chunks:
                    await ex.body(chunk)
                    if kept is not None:
                        size += len(chunk)
                        kept = kept if size <= MAX_CACHED_BODY_BYTES else None
                        if kept is not None:
                            kept.append(chunk)
                if kept is not None and keep_as is not None:
                    self.models.remember(backend, ex.method, ex.path, keep_as, response.status,
                                         out, b"".join(kept))
                await ex.end()
        finally:
            driver.active -= 1

    def _count(self, ex: Exchange, backend: NodeBackend, outcome: str) -> None:
        self.metrics.requests.labels(self.listen, backend.name, outcome).inc()
        self.metrics.models.requests.labels(backend.name, ex.model, outcome).inc()


def _lower(raw: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(name.lower(), value) for name, value in raw]
