"""The node-agent's control API: instances, their logs, start/stop/enable/disable, reload, metrics.

Every route but ``/metrics`` and the page at ``/`` (``status_page``; its files hold no data)
needs the bearer token when one is configured (the config
refuses a non-loopback ``api_listen`` without one). Errors are JSON
``{"error": {"message", "type", "source": "node-agent"}}``.

Components offer routes as a registrar ``routes(app: App) -> None``; the agent's root passes
them all to ``build_app``. The core routes get the supervisor, the metrics registry and the
agent's own controls (``AgentControl``: status summary, enable/disable, reload).

Routes:
    GET  /                               the node's page (polls the JSON below)
    GET  /v1/status                      agent summary, last reload, all instances
    GET  /v1/instances                   all instances
    GET  /v1/instances/{name}            one instance
    GET  /v1/instances/{name}/logs?lines=N&after=SEQ   its recent output (after line SEQ)
    POST /v1/instances/{name}/{action}   action: start, stop, restart, enable, disable
                                         (body {"wait": true, "timeout_s": N} waits for
                                         READY or STOPPED); starting an on-demand instance
                                         is the scheduler's decision (409 load_refused)
    POST /v1/reload                      re-read the config, act on the difference
    GET  /metrics                        Prometheus text format
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import trio

from inference_node import status_page
from inference_node.errors import LoadRefused
from inference_node.supervisor import ReloadPlan, State, Supervisor
from inference_node.supervisor.instance import Instance
from inference_node.supervisor.supervisor import SETTLED
from shared.cli import package_version
from shared.errors import ConfigError, LlamanapError
from shared.http import App, HTTPError, Request, Response, metrics_response

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from shared.config.loader import Secret

SOURCE = "node-agent"
METRICS_PATH = "/metrics"
DEFAULT_LOG_LINES = 100
MAX_LOG_LINES = 100_000
# How long a request with {"wait": true} may wait when it gives no timeout_s.
DEFAULT_WAIT_S = 300.0
MAX_WAIT_S = 3600.0
ACTIONS = ("start", "stop", "restart", "enable", "disable")

RouteRegistrar = Callable[[App], None]


class AgentControl(Protocol):
    """What the core routes ask of the agent itself."""

    def summary(self) -> dict[str, Any]:
        """``node``, ``config``, ``api`` and ``last_reload`` for ``GET /v1/status``."""
        ...

    def set_enabled(self, name: str, enabled: bool, reason: str) -> None:
        """Persist an enable/disable and start or stop the instance to match."""
        ...

    async def reload(self, reason: str) -> ReloadPlan:
        """Re-read the config and act on the difference; raises ``ConfigError``."""
        ...

    async def start(self, name: str, reason: str) -> None:
        """Start an instance; a ``load = "on-demand"`` one through the scheduler's decision
        (it may evict or wait first); raises ``LoadRefused`` with the reason."""
        ...


def build_app(token: Secret | None, registrars: Sequence[RouteRegistrar]) -> App:
    """The ASGI app with the routes of every registrar, and the node's page."""
    app = App(SOURCE, token, public=frozenset({METRICS_PATH}) | status_page.PUBLIC_PATHS)
    status_page.routes(app)
    for register in registrars:
        register(app)
    return app


def core_routes(sup: Supervisor, agent: AgentControl,
                registry: CollectorRegistry) -> RouteRegistrar:
    """Instances, logs, actions, reload, metrics."""
    return lambda app: _core_routes(app, sup, agent, registry)


def _core_routes(app: App, sup: Supervisor, agent: AgentControl,
                 registry: CollectorRegistry) -> None:

    def instance(req: Request) -> Instance:
        name = req.params["name"]
        try:
            return sup.get(name)
        except KeyError:
            known = ", ".join(sup.names) or "none"
            raise HTTPError(404, f"no instance named {name!r}; known: {known}",
                            "not_found_error") from None

    def row(name: str) -> dict[str, Any]:
        return next(r.to_json() for r in sup.snapshot() if r.name == name)

    @app.route("GET", "/v1/status")
    async def status(req: Request) -> Response:
        summary = agent.summary()
        return Response.json({
            "node": summary["node"],
            "version": package_version(),
            "config": summary["config"],
            "api": summary["api"],
            "last_reload": summary["last_reload"],
            "instances": [r.to_json() for r in sup.snapshot()],
        })

    @app.route("GET", "/v1/instances")
    async def list_instances(req: Request) -> Response:
        return Response.json({"instances": [r.to_json() for r in sup.snapshot()]})

    @app.route("GET", "/v1/instances/{name}")
    async def get_instance(req: Request) -> Response:
        return Response.json(row(instance(req).name))

    @app.route("GET", "/v1/instances/{name}/logs")
    async def logs(req: Request) -> Response:
        inst = instance(req)
        text = req.query.get("lines", str(DEFAULT_LOG_LINES))
        if not text.isdigit() or not 0 < int(text) <= MAX_LOG_LINES:
            raise HTTPError(400, f"lines={text!r}; expected a number from 1 to {MAX_LOG_LINES}")
        after = req.query.get("after", "0")
        if not after.isdigit():
            raise HTTPError(400, f"after={after!r}; expected the seq of a line already seen")
        lines = inst.ring.tail(int(text), int(after))
        return Response.json({"instance": inst.name, "lines": [
            {"seq": line.seq, "time": line.time, "stream": line.stream, "text": line.text}
            for line in lines]})

    @app.route("POST", "/v1/instances/{name}/{action}")
    async def act(req: Request) -> Response:
        inst = instance(req)
        action = req.params["action"]
        if action not in ACTIONS:
            raise HTTPError(404, f"no action {action!r}; use one of {', '.join(ACTIONS)}",
                            "not_found_error")
        wait, timeout_s = _wait_options(req)
        why = f"{action} requested through the API"
        mark = inst.transitions
        try:
            if action == "start" or (action == "restart" and not inst.is_running
                                     and inst.config.load == "on-demand"):
                await agent.start(inst.name, why)  # the memory check holds for it too
            elif action == "stop":
                sup.stop(inst.name, why)
            elif action == "restart":
                sup.restart(inst.name, why)
            else:
                agent.set_enabled(inst.name, action == "enable", why)
        except LoadRefused as exc:
            raise HTTPError(409, f"start {inst.name}: {exc}", "load_refused") from exc
        except LlamanapError as exc:
            raise HTTPError(500, str(exc), "server_error") from exc
        timed_out = False
        if wait:
            with trio.move_on_after(timeout_s) as scope:
                if not inst.wanted:
                    await inst.wait_for(SETTLED)
                else:
                    if inst.state is not State.READY or action == "restart":
                        await inst.wait_transition(mark)  # the owner task took the request
                    await inst.wait_for(frozenset({State.READY, State.FAILED}))
            timed_out = scope.cancelled_caught
        body = row(inst.name) | {"action": action, "timed_out": timed_out}
        return Response.json(body)

    @app.route("POST", "/v1/reload")
    async def reload(req: Request) -> Response:
        try:
            plan = await agent.reload("reload requested through the API")
        except ConfigError as exc:
            raise HTTPError(400, f"config error, nothing changed: {exc}", "config_error") from exc
        return Response.json({"ok": True, **plan.to_json()})

    @app.route("GET", METRICS_PATH)
    async def metrics(req: Request) -> Response:
        return metrics_response(registry)


def _wait_options(req: Request) -> tuple[bool, float]:
    body = req.json() if req.body else {}
    if not isinstance(body, dict):
        raise HTTPError(400, 'body must be a JSON object such as {"wait": true, "timeout_s": 60}')
    wait = body.get("wait", False)
    timeout = body.get("timeout_s", DEFAULT_WAIT_S)
    if not isinstance(wait, bool):
        raise HTTPError(400, f"wait={wait!r}; expected true or false")
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) \
            or not 0 < timeout <= MAX_WAIT_S:
        raise HTTPError(400, f"timeout_s={timeout!r}; expected a number from 0 to {MAX_WAIT_S:g}")
    return wait, float(timeout)
