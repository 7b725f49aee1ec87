"""The control endpoint: ``GET /status``, ``GET /metrics``, agent events and reports,
operator wakes, and what is held for a node (``GET /v1/nodes/NODE/held``, which a resuming
agent asks so it starts those models first).

Authentication: every path needs ``Authorization: Bearer TOKEN`` when ``control.token`` is set,
except ``/metrics``, which is public so Prometheus can scrape without a secret (it holds
counts, no hosts, MACs or tokens), and the dashboard's page files at ``/`` (they hold no data;
the JSON they poll needs the token, which the page takes from ``/#token=...`` or a form). Without a token the endpoint must listen on loopback (the
config enforces it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge_proxy.dashboard.history_db import DatabaseHistory
from edge_proxy.dashboard.routes import PUBLIC_PATHS as DASHBOARD_PATHS
from edge_proxy.dashboard.routes import dashboard_routes
from shared.events import EVENTS_PATH, HELD_PATH, EventError, EventReply, decode_event
from shared.http import App, HTTPError, Request, Response, metrics_response
from shared.reports import REPORTS_PATH, ReportError, decode_batch

if TYPE_CHECKING:
    from edge_proxy.service import Proxy
    from edge_proxy.wake.driver import NodeDriver

SOURCE = "edge-proxy"
STATUS_PATH = "/status"
METRICS_PATH = "/metrics"
WAKE_PATH = "/v1/nodes/{node}/wake"


def build_app(proxy: Proxy) -> App:
    """The control app for ``proxy`` (its token is read again after a reload)."""
    app = App(SOURCE, proxy.cfg.control.token,
              public=frozenset({METRICS_PATH}) | DASHBOARD_PATHS)
    dashboard_routes(app, proxy.status, lambda: DatabaseHistory.from_config(proxy.cfg))

    def driver(name: str) -> NodeDriver:
        found = proxy.drivers.get(name)
        if found is None:
            known = ", ".join(sorted(proxy.drivers)) or "(none)"
            raise HTTPError(404, f"unknown node {name!r}; known nodes: {known}", "not_found_error")
        return found

    @app.route("GET", STATUS_PATH)
    async def status(req: Request) -> Response:
        return Response.json(proxy.status())

    @app.route("GET", METRICS_PATH)
    async def metrics(req: Request) -> Response:
        return metrics_response(proxy.metrics.registry)

    @app.route("POST", EVENTS_PATH)
    async def event(req: Request) -> Response:
        try:
            message = decode_event(req.body)
        except EventError as exc:
            raise HTTPError(400, f"bad event: {exc}") from exc
        node = driver(message.node)
        if message.models is not None:
            proxy.knowledge.from_agent(node.name, message.models)
        if message.event == "models":
            allowed, reason = True, "models noted"
        elif message.event == "unloading":
            allowed, reason = True, proxy.unloading(node.name, message.unloading or (),
                                                    message.reason or "no reason given")
        elif message.event == "suspending":
            verdict = node.suspending()
            allowed, reason = verdict.allowed, verdict.reason
        else:
            node.agent_event(message.event, message.reason or "no reason given")
            allowed, reason = True, f"{message.event} noted"
        reply = EventReply(node=node.name, allowed=allowed, state=node.state.name,
                           in_flight=node.active, held=node.held, reason=reason)
        return Response(200, reply.encode() + b"\n")

    @app.route("GET", HELD_PATH)
    async def held(req: Request) -> Response:
        return Response(200, driver(req.params["node"]).held_work().encode() + b"\n")

    @app.route("POST", REPORTS_PATH)
    async def reports(req: Request) -> Response:
        try:
            batch = decode_batch(req.body)
        except ReportError as exc:
            raise HTTPError(400, f"bad report: {exc}") from exc
        driver(batch.node)  # an unknown node is a 404, as for events
        return Response(200, proxy.reports.receive(batch).encode() + b"\n")

    @app.route("POST", WAKE_PATH)
    async def wake(req: Request) -> Response:
        node = driver(req.params["node"])
        node.wake_now("requested through the control endpoint")
        return Response.json({"node": node.name, "state": node.state.name,
                              "packets_sent": node.machine.packets})

    return app
