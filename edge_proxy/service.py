"""The whole proxy: node drivers, TCP routes and the control endpoint, reloadable in place.

``serve_proxy(cfg, task_status=...)`` runs a proxy in-process (tests and demos start it with
``await nursery.start(serve_proxy, cfg)`` and get the ``Proxy`` back once every route and the
control endpoint listen). ``run_service(path)`` is the ``edge-proxy run`` command: it adds
the open-file limit, systemd readiness and watchdog pings (from the event loop, so a hung
loop gets the proxy restarted), SIGHUP reload and SIGTERM graceful shutdown.
"""

from __future__ import annotations

import functools
import logging
import resource
import signal
import urllib.parse
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import trio

from edge_proxy.admission import ConnectionCounts
from edge_proxy.alerts.runner import AlertRunner
from edge_proxy.control import build_app
from edge_proxy.errors import ListenError, LoadFailed
from edge_proxy.history import query
from edge_proxy.history.records import ReportMark
from edge_proxy.history.store import NullRecorder, Recorder, open_recorder
from edge_proxy.http_routes.knowledge import ModelKnowledge
from edge_proxy.http_routes.service import HttpRoutes
from edge_proxy.loading import AgentClient, ModelGate, ModelLoader
from edge_proxy.metrics import ProxyMetrics
from edge_proxy.reports.history_sink import HistorySink
from edge_proxy.reports.intake import ReportIntake
from edge_proxy.reports.sink import MemorySink, ReportSink
from edge_proxy.tcp_routes.listener import Route
from edge_proxy.tcp_routes.relay_loop import RelayLoop
from edge_proxy.wake.driver import Backend, NodeDriver
from edge_proxy.wake.machine import State
from edge_proxy.wake.wol import UdpWolSender, WolSender
from shared import systemd
from shared.config.edge import EdgeConfig, RouteConfig, load_edge_config
from shared.config.values import HostPort
from shared.errors import ConfigError, LlamanapError
from shared.http import serve

log = logging.getLogger(__name__)

RelayEngine = Literal["loop", "trio"]  # see tcp_routes.relay
# An awake node's agent is asked for its models this often (kept while the node sleeps).
MODELS_REFRESH_INTERVAL_S = 5.0
# Until an awake node's agent has answered once, it is asked this often (a list soon after
# the agent comes up, so frontends see every model).
FIRST_MODELS_RETRY_S = 0.25
# The node is up when its agent answers here (no token needed), for nodes with agent_url.
AGENT_READY_PATH = "/metrics"


def _route_key(index: int, cfg: RouteConfig) -> str:
    # port 0 (tests) may repeat; each such route is its own listener
    return f"{cfg.listen_addr}#{index}" if cfg.listen_addr.port == 0 else str(cfg.listen_addr)


class Proxy:
    """A running edge proxy. Attributes are read by the control endpoint and by tests."""

    def __init__(self, cfg: EdgeConfig, sender: WolSender | None = None, *,
                 relay_engine: RelayEngine = "loop", recorder: Recorder | None = None,
                 report_marks: Iterable[ReportMark] = ()) -> None:
        """``report_marks``: how far each node's reports are stored (from the history)."""
        self.cfg = cfg
        self.metrics = ProxyMetrics()
        self.sender: WolSender = sender or UdpWolSender()
        # "trio": the loop is never started, so every relay takes the trio engine (benchmarks)
        self.relay_engine = relay_engine
        self.relay_loop = RelayLoop()
        self.counts = ConnectionCounts(cfg.limits)
        self.drivers: dict[str, NodeDriver] = {}
        self.routes: dict[str, Route] = {}
        self.recorder = recorder  # None: history is off
        # nodes with an agent (agent_url): their models on demand, loaded one at a time each
        self.loader = ModelLoader(self._agent_load, lambda node: self.cfg.nodes[node].load_timeout_s)
        self.gates: dict[str, ModelGate] = {}
        # What each node serves; read at start from state_dir, which a reload does not move.
        self.knowledge = ModelKnowledge(cfg.state_dir)
        self.http_routes = HttpRoutes(self.metrics.registry,  # protocol = "http" listeners
                                      self.knowledge, recorder=recorder, gates=self.gates,
                                      relay_loop=self.relay_loop)
        self.alerts = AlertRunner(cfg.alerts, self.metrics.registry,
                                  wake_failures=self._wake_failures)
        # With history on, what nodes report becomes rows of it (the newest also in memory).
        self.report_sink: ReportSink = MemorySink() if recorder is None else HistorySink(recorder)
        self.reports = ReportIntake(self.report_sink, self.alerts.observe, self.metrics.registry,
                                    report_marks)
        self.app = build_app(self)
        self.control_urls: list[str] = []
        self._driver_scopes: dict[str, trio.CancelScope] = {}
        self._services: trio.Nursery | None = None
        self._connections: trio.Nursery | None = None
        self._stop = trio.Event()
        self._started = 0.0

    def __repr__(self) -> str:
        return f"<Proxy nodes={list(self.drivers)} routes={list(self.routes)} open={self.counts.open}>"

    def route_address(self, index: int = 0) -> tuple[str, int]:
        """The first bound address of ``cfg.routes[index]`` (useful with port 0)."""
        return self.routes[_route_key(index, self.cfg.routes[index])].addresses[0]

    @property
    def control_url(self) -> str:
        return self.control_urls[0]

    async def run(self, *, task_status: trio.TaskStatus[Proxy] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until ``stop()``; then stop accepting and give relays ``shutdown_grace_s``."""
        self._started = trio.current_time()
        async with trio.open_nursery() as connections, trio.open_nursery() as services:
            self._connections, self._services = connections, services
            if self.relay_engine == "loop":
                await services.start(self.relay_loop.run)
            await services.start(self.loader.run)
            services.start_soon(self._refresh_models)
            interval = systemd.watchdog_interval_s()
            if interval is not None:  # pings stop with the event loop, or with the proxy
                services.start_soon(_watchdog, interval)
            await self._apply(self.cfg, initial=True)
            await services.start(self.alerts.run)
            addr = self.cfg.control.listen
            try:
                self.control_urls = await services.start(serve, self.app, _hostport(self.cfg))
            except (OSError, BaseExceptionGroup) as exc:
                err = _find(exc, OSError)
                if err is None:
                    raise
                raise ListenError(f"control.listen {addr}: cannot listen: "
                                  f"{err.strerror or err}; pick another port") from exc
            task_status.started(self)
            await self._stop.wait()
            for route in self.routes.values():
                route.stop()
            self.http_routes.stop()
            grace = self.cfg.limits.shutdown_grace_s
            log.info("stopping: %d connection(s) open, waiting up to %g s",
                     self.counts.open, grace)
            with trio.move_on_after(grace):
                await self.counts.wait_idle()
            if self.counts.open:
                log.warning("stopping: closing %d connection(s) after the grace period",
                            self.counts.open)
            connections.cancel_scope.cancel()  # (services run inside it)
        with trio.CancelScope(shield=True):
            for gate in self.gates.values():
                await gate.client.aclose()

    def unloading(self, node: str, instances: Sequence[str], reason: str) -> str:
        """The node's agent is about to stop ``instances`` (an ``unloading`` event): their
        models get no new request until loaded again. Returns the reply's reason."""
        gate = self.gates.get(node)
        if gate is None:
            return f"node {node} has no agent_url here: nothing to mark"
        gate.table.evicted(instances)
        log.info("node %s: %s stopping (%s): their models wait for a load now", node,
                 ", ".join(instances), reason)
        return f"{len(instances)} instance(s) marked unloaded"

    def stop(self) -> None:
        """Begin a graceful shutdown."""
        self._stop.set()

    async def reload(self, cfg: EdgeConfig) -> None:
        """Apply a new config: new routes open, removed ones close, running relays go on."""
        if cfg.control.listen != self.cfg.control.listen:
            log.warning("control.listen changed to %s; that takes a restart", cfg.control.listen)
        if cfg.history != self.cfg.history:
            log.warning("[history] changed; that takes a restart")
        if cfg.state_dir != self.cfg.state_dir:
            log.warning("state_dir changed to %s; that takes a restart", cfg.state_dir)
        await self._apply(cfg, initial=False)
        self.app.token = cfg.control.token
        self.alerts.reconfigure(cfg.alerts)
        if cfg.log_level != self.cfg.log_level:
            logging.getLogger().setLevel(cfg.log_level.upper())
        self.cfg = cfg
        log.info("config reloaded: %d node(s), %d route(s)", len(cfg.nodes), len(cfg.routes))

    async def _apply(self, cfg: EdgeConfig, *, initial: bool) -> None:
        assert self._services is not None and self._connections is not None
        self.counts.limits = cfg.limits
        await self._apply_gates(cfg)
        for name, node_cfg in cfg.nodes.items():
            if name in self.drivers:
                self.drivers[name].update(node_cfg)
                self.drivers[name].backends = _backends(cfg, name)
            else:
                driver = NodeDriver(name, node_cfg, self.metrics, self.sender,
                                    recorder=self.recorder)
                self.drivers[name] = driver
                driver.backends = _backends(cfg, name)
                self._driver_scopes[name] = scope = trio.CancelScope()
                await self._services.start(self._run_driver, driver, scope)
        for name in set(self.drivers) - set(cfg.nodes):
            self._driver_scopes.pop(name).cancel()
            self.drivers.pop(name).close(f"node {name} was removed from the config")
        await self.http_routes.apply(cfg, self.drivers, self.counts, self._services,
                                     initial=initial)
        wanted = {_route_key(i, r): r for i, r in enumerate(cfg.routes) if r.protocol == "tcp"}
        for key in set(self.routes) - set(wanted):
            self.routes.pop(key).stop()
        for key, route_cfg in wanted.items():
            if key in self.routes:
                self.routes[key].update(route_cfg, self.drivers[route_cfg.node])
                continue
            route = Route(route_cfg, self.drivers[route_cfg.node], self.counts, self.metrics,
                          self.relay_loop, recorder=self.recorder, gates=self.gates)
            try:
                await self._services.start(route.serve, self._connections)
            except ListenError as exc:
                if initial:
                    raise
                log.error("reload: %s", exc)
                continue
            self.routes[key] = route

    async def _apply_gates(self, cfg: EdgeConfig) -> None:
        """A gate per node with an agent; one whose agent_url or token changed is new."""
        for name in list(self.gates):
            node = cfg.nodes.get(name)
            old = self.cfg.nodes.get(name)
            if node is None or node.agent_url is None or old is None or (
                    (node.agent_url, node.agent_token) != (old.agent_url, old.agent_token)):
                await self.gates.pop(name).client.aclose()
        for name, node in cfg.nodes.items():
            if node.agent_url is not None and name not in self.gates:
                self.gates[name] = ModelGate(name, AgentClient(name, node), self.loader)

    async def _agent_load(self, node: str, model: str) -> list[str]:
        gate = self.gates.get(node)
        if gate is None:
            raise LoadFailed(model, node, f"nodes.{node}.agent_url was removed")
        return await gate.client.load(model)

    async def _refresh_models(self) -> None:
        """Learn each awake node's models from its agent (kept while it sleeps)."""
        last: dict[str, float] = {}
        while True:
            now = trio.current_time()
            for name, gate in list(self.gates.items()):
                driver = self.drivers.get(name)
                due = gate.table.seen_at is None or (
                    now - last.get(name, -MODELS_REFRESH_INTERVAL_S) >= MODELS_REFRESH_INTERVAL_S)
                if driver is not None and driver.state is State.AWAKE and due:
                    last[name] = now
                    await gate.refresh()
            await trio.sleep(FIRST_MODELS_RETRY_S)

    @staticmethod
    async def _run_driver(driver: NodeDriver, scope: trio.CancelScope, *,
                          task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await driver.run(task_status=task_status)

    def status(self) -> dict[str, Any]:
        """What ``GET /status`` shows: nodes, states, connections, routes."""
        return {
            "uptime_s": round(trio.current_time() - self._started, 3),
            "connections_open": self.counts.open,
            "relay_engine": self._engine_status(),
            "held_total": self.counts.held_total,
            "nodes": {name: d.status() | {"models": list(self.knowledge.ids(name))}
                      for name, d in sorted(self.drivers.items())},
            "routes": [{"listen": r.cfg.listen, "node": r.cfg.node,
                        "backend_port": r.cfg.backend_port, "ready": r.cfg.ready,
                        "addresses": [f"{h}:{p}" for h, p in r.addresses]}
                       for r in self.routes.values()] + self.http_routes.status(),
            "reports": self.reports.status(),
            "alerts": [a.to_json() for a in self.alerts.raised[-5:]],
        }

    def _wake_failures(self) -> dict[str, float]:
        """Failed wakes so far per node, as ``edge_wake_failures_total`` counts them (read
        from that counter alone: the registry's own lookup collects every series there is,
        each second)."""
        counted = {sample.labels["node"]: sample.value
                   for metric in self.metrics.wake_failures.collect()
                   for sample in metric.samples if sample.name == "edge_wake_failures_total"}
        return {name: counted.get(name, 0.0) for name in self.drivers}

    def _engine_status(self) -> str:
        """Which engine relays TCP routes now, and why it is not the loop when it is not."""
        if self.relay_loop.failure is not None:
            return f"trio (the relay loop failed: {self.relay_loop.failure!r})"
        return "loop" if self.relay_engine == "loop" else "trio"


def _backends(cfg: EdgeConfig, node: str) -> set[Backend]:
    agent_url = cfg.nodes[node].agent_url
    if agent_url is not None:
        # Instances on demand are down until asked for: the node is up when its agent is
        # (its /metrics needs no token); each model's own readiness is the agent's load.
        parts = urllib.parse.urlsplit(agent_url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return {Backend(port, AGENT_READY_PATH)}
    return {Backend(r.backend_port, r.ready_http_path) for r in cfg.routes if r.node == node}


def _hostport(cfg: EdgeConfig) -> HostPort:
    host, _, port = cfg.control.listen.rpartition(":")
    return HostPort(host.strip("[]"), int(port))


async def serve_proxy(cfg: EdgeConfig, sender: WolSender | None = None, *,
                      relay_engine: RelayEngine = "loop",
                      task_status: trio.TaskStatus[Proxy] = trio.TASK_STATUS_IGNORED) -> None:
    """Run a proxy for ``cfg`` in this trio run; ``task_status`` gets the ``Proxy`` once it listens."""
    async with open_recorder(cfg.history) as recorder:  # outlives the proxy: rows of the
        # requests that finish during the shutdown grace are written too
        # history off: no recorder at all, so requests build no rows to throw away
        kept = None if isinstance(recorder, NullRecorder) else recorder
        marks = [] if kept is None else await trio.to_thread.run_sync(
            query.stored_marks, cfg.history.db_path)
        await Proxy(cfg, sender, relay_engine=relay_engine, recorder=kept,
                    report_marks=marks).run(task_status=task_status)


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (each relay needs two descriptors)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


async def run_service(path: Path, *, relay_engine: RelayEngine = "loop") -> None:
    """``edge-proxy run``: serve ``path``'s config until SIGTERM/SIGINT; SIGHUP reloads it.
    Under a unit with ``WatchdogSec=`` the proxy pings systemd at half that interval."""
    cfg = load_edge_config(path)
    systemd.claim()
    limit = raise_open_file_limit()
    log.info("open-file limit: %d", limit)
    with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            proxy: Proxy = await nursery.start(
                functools.partial(serve_proxy, cfg, relay_engine=relay_engine))
            systemd.ready(f"{len(cfg.routes)} route(s), control on {proxy.control_url}")
            async for signum in signals:
                if signum == signal.SIGHUP:
                    systemd.reloading()
                    try:
                        await proxy.reload(load_edge_config(path))
                    except ConfigError as exc:
                        log.error("reload refused, keeping the running config: %s", exc)
                    systemd.ready("reloaded")
                else:
                    systemd.stopping()
                    proxy.stop()
                    break


async def _watchdog(interval_s: float) -> None:
    """Ping systemd's watchdog from the event loop: if the loop hangs, the pings stop."""
    while True:
        systemd.watchdog()
        await trio.sleep(interval_s)


def _find(exc: BaseException, kind: type[OSError]) -> OSError | None:
    """The first ``kind`` inside (nested) exception groups, or None."""
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _find(inner, kind)
            if found is not None:
                return found
    return None


def first_user_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """A start-up failure comes wrapped by nurseries; show the user the one-line error."""
    for exc in group.exceptions:
        if isinstance(exc, LlamanapError):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            found = first_user_error(exc)
            if isinstance(found, LlamanapError):
                return found
    return group
