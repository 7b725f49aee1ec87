"""An HTTP-aware listener: ``h1.H1Server`` serving one ``HttpRouteApp``.

``protocol = "http"`` routes with the same ``listen`` string form one listener that routes
by model across their backends: nodes, or instances of one node on different ports
(``group_http_routes``). Besides the server, the listener runs each backend's upstream pool
janitor and a learner that fetches its ``/v1/models`` each time its node becomes AWAKE, so
model routing and the poll cache are filled even before a client asks.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterable, Mapping
from typing import Final

import trio

from edge_proxy.admission import ConnectionCounts
from edge_proxy.errors import ListenError
from edge_proxy.history.store import Recorder
from edge_proxy.http_routes.app import HttpRouteApp
from edge_proxy.http_routes.backend import NodeBackend
from edge_proxy.http_routes.knowledge import ModelKnowledge
from edge_proxy.http_routes.metrics import HttpMetrics
from edge_proxy.http_routes.models import backend_keys
from edge_proxy.http_routes.upstream import Upstream
from edge_proxy.loading import ModelGate
from edge_proxy.tcp_routes.relay_loop import RelayLoop
from edge_proxy.wake.driver import NodeDriver
from edge_proxy.wake.machine import State
from shared.config.edge import HttpOptions, RouteConfig
from shared.h1 import H1Server, listener_url

log = logging.getLogger(__name__)

# How often the learner looks for a node that became AWAKE (a state read, no I/O).
LEARN_POLL_S: Final = 1.0
# The accept queue, as TCP routes get it from trio.open_tcp_listeners: the most the kernel
# allows (it caps the number at net.core.somaxconn). A short one (100, a common default) lets
# a burst of clients overflow the queue before the accept loop runs, and the kernel drops or
# resets them without the proxy ever seeing them.
LISTEN_BACKLOG: Final = 0xFFFF


def group_http_routes(routes: Iterable[RouteConfig]) -> dict[str, list[RouteConfig]]:
    """HTTP routes by listener, in config order: routes with the same ``listen`` string and
    different backends (node and backend_port) share one (the config check rejects a backend
    twice on one fixed port; on port 0 a repeated backend starts another listener, keyed
    ``listen#N``)."""
    groups: dict[str, list[RouteConfig]] = {}
    for route in routes:
        if route.protocol != "http":
            continue
        key, n = route.listen, 1
        while any((r.node, r.backend_port) == (route.node, route.backend_port)
                  for r in groups.get(key, [])):
            key, n = f"{route.listen}#{n}", n + 1
        groups.setdefault(key, []).append(route)
    return groups


class HttpListener:
    """One listening address in front of one or more nodes."""

    def __init__(self, routes: list[RouteConfig], drivers: Mapping[str, NodeDriver],
                 counts: ConnectionCounts, metrics: HttpMetrics, knowledge: ModelKnowledge,
                 recorder: Recorder | None = None,
                 gates: Mapping[str, ModelGate] | None = None,
                 relay_loop: RelayLoop | None = None) -> None:
        if not routes:
            raise ValueError("an HTTP listener needs at least one route")
        self.listen = routes[0].listen
        self.options = next((r.http for r in routes if r.http is not None), HttpOptions())
        backends = [NodeBackend(r, drivers[r.node], _upstream(r, drivers[r.node]), key)
                    for r, key in zip(routes, _keys(routes), strict=True)]
        self.app = HttpRouteApp(self.listen, backends, self.options, counts, metrics,
                                knowledge, recorder=recorder, gates=gates,
                                relay_loop=relay_loop)
        self.counts = counts
        self.urls: list[str] = []
        self._stopping = trio.Event()
        self._backend_tasks: trio.Nursery | None = None
        self._learners: dict[int, trio.CancelScope] = {}  # by id() of the backend's upstream

    def __repr__(self) -> str:
        nodes = ", ".join(self.app.backends)
        return f"<HttpListener {self.listen} -> {nodes} urls={self.urls}>"

    def stop(self) -> None:
        """Stop accepting; requests in flight get ``limits.shutdown_grace_s`` to finish."""
        self._stopping.set()

    def update(self, routes: list[RouteConfig], drivers: Mapping[str, NodeDriver]) -> None:
        """Apply reloaded routes of this listener: nodes added or removed, backend ports,
        models and HTTP options changed (``client_keepalive_s`` excepted: that takes a
        restart). Requests in flight finish on the connections they started with."""
        options = next((r.http for r in routes if r.http is not None), HttpOptions())
        if options.client_keepalive_s != self.options.client_keepalive_s:
            log.warning("http route %s: client_keepalive_s changes at the next restart",
                        self.listen)
        old = self.app.backends
        backends = []
        for route, key in zip(routes, _keys(routes), strict=True):
            # by key: a backend whose key changed starts afresh (its learner holds the old one)
            prev = old.get(key)
            if prev is not None and prev.route.backend_port == route.backend_port \
                    and prev.driver is drivers[route.node]:
                backends.append(NodeBackend(route, prev.driver, prev.upstream, key))
            else:
                backends.append(NodeBackend(route, drivers[route.node],
                                            _upstream(route, drivers[route.node]), key))
        kept = {id(b.upstream) for b in backends}
        for prev in old.values():
            if id(prev.upstream) not in kept:
                prev.upstream.retire()
                self._learners.pop(id(prev.upstream)).cancel()
        self.app.configure(backends, options)
        self.options = options
        previous = {id(b.upstream) for b in old.values()}
        for backend in backends:
            if id(backend.upstream) not in previous:
                self._start_backend_tasks(backend)
        log.info("http route %s reloaded: %s", self.listen, self.app.models.table)

    async def serve(self, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        """Listen, report the bound URLs via ``task_status``, serve until ``stop()``."""
        addr = next(iter(self.app.backends.values())).route.listen_addr
        server = H1Server(self.app.handle, keep_alive_s=self.options.client_keepalive_s,
                          grace_s=self.counts.limits.shutdown_grace_s)
        try:
            listeners = await trio.open_tcp_listeners(addr.port, host=addr.host,
                                                      backlog=LISTEN_BACKLOG)
        except OSError as exc:
            hint = "stop the other program or pick another port" \
                if exc.errno == errno.EADDRINUSE else "use an address of this machine"
            raise ListenError(f"route {self.listen}: cannot listen: "
                              f"{exc.strerror or exc}; {hint}") from exc
        self.urls = [listener_url(listener) for listener in listeners]
        async with trio.open_nursery() as nursery:
            self._backend_tasks = nursery
            for backend in self.app.backends.values():
                self._start_backend_tasks(backend)

            async def run_server() -> None:
                await server.serve(listeners, self._stopping.wait)
                nursery.cancel_scope.cancel()  # the server is done: so are the backend tasks

            nursery.start_soon(run_server)
            log.info("http route %s -> %s listening on %s", self.listen,
                     ", ".join(self.app.backends), ", ".join(self.urls))
            task_status.started(self.urls)
        log.info("http route %s closed", self.listen)

    def _start_backend_tasks(self, backend: NodeBackend) -> None:
        """The backend's pool janitor, and its learner (cancelled when the node leaves)."""
        assert self._backend_tasks is not None, "serve() runs the backend tasks"
        scope = self._learners[id(backend.upstream)] = trio.CancelScope()
        self._backend_tasks.start_soon(backend.upstream.run)
        self._backend_tasks.start_soon(self._learn, backend, scope)

    async def _learn(self, backend: NodeBackend, scope: trio.CancelScope) -> None:
        learned_at: int | None = None
        with scope:
            while True:
                driver = backend.driver
                if driver.state is State.AWAKE and driver.machine.generation != learned_at:
                    learned_at = driver.machine.generation
                    await self.app.models.fetch(backend)
                await trio.sleep(LEARN_POLL_S)


def _keys(routes: list[RouteConfig]) -> list[str]:
    return backend_keys([(r.node, r.backend_port) for r in routes])


def _upstream(route: RouteConfig, driver: NodeDriver) -> Upstream:
    # a node with an agent runs instances on demand: no idle connections to slow an eviction
    return Upstream(route.node, route.backend_port, keep_alive=driver.cfg.agent_url is None)
