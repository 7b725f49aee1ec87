"""The HTTP-aware listeners of one proxy, kept in step with its config."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import trio
from prometheus_client import CollectorRegistry

from edge_proxy.admission import ConnectionCounts
from edge_proxy.errors import ListenError
from edge_proxy.history.store import Recorder
from edge_proxy.http_routes.knowledge import ModelKnowledge
from edge_proxy.http_routes.metrics import HttpMetrics
from edge_proxy.http_routes.server import HttpListener, group_http_routes
from edge_proxy.loading import ModelGate
from edge_proxy.metrics import watch_listen_overflows
from edge_proxy.tcp_routes.relay_loop import RelayLoop
from edge_proxy.wake.driver import NodeDriver
from shared.config.edge import EdgeConfig, RouteConfig

log = logging.getLogger(__name__)


class HttpRoutes:
    """Starts a listener per group of ``protocol = "http"`` routes; ``stop()`` stops them all."""

    def __init__(self, registry: CollectorRegistry, knowledge: ModelKnowledge, *,
                 recorder: Recorder | None = None,
                 gates: Mapping[str, ModelGate] | None = None,
                 relay_loop: RelayLoop | None = None) -> None:
        self.relay_loop = relay_loop  # passes streamed answers on
        self.metrics = HttpMetrics(registry)
        self.knowledge = knowledge
        self.recorder = recorder
        self.gates = gates  # nodes with an agent: their models on demand (the proxy's)
        self.listeners: dict[str, HttpListener] = {}
        self._routes: dict[str, list[RouteConfig]] = {}

    def __repr__(self) -> str:
        return f"<HttpRoutes {list(self.listeners)}>"

    async def apply(self, cfg: EdgeConfig, drivers: Mapping[str, NodeDriver],
                    counts: ConnectionCounts, services: trio.Nursery, *, initial: bool) -> None:
        """Open listeners that are new in ``cfg``, stop those it no longer has, update those
        whose routes changed (``HttpListener.update``)."""
        if initial:  # host-wide: one watcher per proxy, whatever its routes
            services.start_soon(watch_listen_overflows)
        wanted = group_http_routes(cfg.routes)
        for key in set(self.listeners) - set(wanted):
            self.listeners.pop(key).stop()
            self._routes.pop(key)
        for key, routes in wanted.items():
            if key in self.listeners:
                if self._routes[key] != routes:
                    self.listeners[key].update(routes, drivers)
                    self._routes[key] = routes
                continue
            listener = HttpListener(routes, drivers, counts, self.metrics, self.knowledge,
                                    self.recorder, self.gates, self.relay_loop)
            try:
                await services.start(listener.serve)
            except ListenError as exc:
                if initial:
                    raise
                log.error("reload: %s", exc)
                continue
            self.listeners[key] = listener
            self._routes[key] = routes

    def stop(self) -> None:
        for listener in self.listeners.values():
            listener.stop()

    def url(self, key: str) -> str:
        """The first bound URL of the listener for ``key`` (a ``listen`` string)."""
        return self.listeners[key].urls[0]

    def status(self) -> list[dict[str, Any]]:
        """Each listener, with its requests in flight (all, and per backend they were sent to;
        the difference is requests still being read or answered by the proxy itself)."""
        out = []
        for key, listener in self.listeners.items():
            in_flight = listener.app.in_flight()
            out.append({"listen": key, "protocol": "http", "urls": listener.urls,
                        "requests_in_flight": sum(in_flight.values()),
                        # keyed by backend: the node's name, or NODE:PORT for a node
                        # with several routes here
                        "nodes": {k: {"node": b.name, "backend_port": b.route.backend_port,
                                      "models": list(listener.app.models.table.served_by(k)),
                                      "in_flight": in_flight.get(k, 0)}
                                  for k, b in listener.app.backends.items()}})
        return out
