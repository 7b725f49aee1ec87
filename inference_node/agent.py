"""The node-agent's composition root: config, supervisor, control API, signals, systemd.

``run_agent(cfg_path, task_status=...)`` runs everything until SIGTERM/SIGINT (or until the
caller cancels it) and always stops the instances on the way out. Tests and the demo run it
in-process with ``agent = await nursery.start(run_agent, path)``.

This module is the one place that wires the agent's parts. Each component (activity, P-states,
VRAM placement, power) gets in its constructor only the few things it uses (the supervisor's
view or controls, the one activity service, the GPU inventory, the P-state release) and offers
what it provides: API routes, metrics collectors, ``on_reload(config)`` and ``run``.
``build_parts`` builds them and subscribes their line sinks and state listeners to the
supervisor; ``run_agent`` registers what they offer and runs each as a task in its nursery.
Tests pass hardware fakes through ``build_parts`` in their ``make_components``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import trio
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.registry import Collector

from inference_node import api
from inference_node.activity.service import ActivityService
from inference_node.gpu.backend import PstateBackend
from inference_node.gpu.inventory import GpuInventory, open_inventory
from inference_node.gpu.nvapi import NvapiBackend
from inference_node.gpu.service import PstateService
from inference_node.ondemand.service import OnDemandService
from inference_node.placement.service import PlacementService
from inference_node.power.service import PowerService
from inference_node.power.suspend import SuspendAction
from inference_node.report.service import ReportService
from inference_node.supervisor import ReloadPlan, Supervisor
from inference_node.supervisor.launch import port_problem
from inference_node.supervisor.metrics import SupervisorCollector
from inference_node.supervisor.orphans import ChildMarker
from inference_node.supervisor.overrides import EnabledOverrides
from shared import systemd
from shared.config.loader import Context
from shared.config.node import NodeAgentConfig, load_node_config
from shared.config.values import parse_hostport
from shared.errors import LlamanapError
from shared.http import App, serve

log = logging.getLogger(__name__)

# Instances get this long beyond their own stop_timeout_s to stop when the agent shuts down
# (systemd's TimeoutStopSec should be larger; it SIGKILLs the whole unit after that).
SHUTDOWN_MARGIN_S = 5.0


class Component(Protocol):
    """A part of the agent with a life of its own (activity, a controller, a policy loop)."""

    def routes(self, app: App) -> None:
        """Add its API routes to ``app`` (nothing, for a part without any)."""
        ...

    def collectors(self) -> list[Collector]:
        """Its Prometheus collectors, registered once before the API starts."""
        ...

    def on_reload(self, config: NodeAgentConfig) -> None:
        """Take the settings of a reloaded config (the ``[agent]`` section never changes)."""
        ...

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled; call ``task_status.started()`` once it is working."""
        ...


@dataclass
class ReloadRecord:
    """The outcome of the last reload, shown by ``status``."""

    ok: bool
    message: str
    at: float  # wall clock


ReloadListener = Callable[[NodeAgentConfig], None]


class Agent:
    """The core of one running node-agent: config, supervisor, enable overrides, reloads.

    Components never see it; ``run_agent`` passes them what they use."""

    def __init__(self, cfg_path: Path, config: NodeAgentConfig) -> None:
        self.cfg_path = cfg_path
        self.config = config
        # Children carry this agent's marker, so a restarted agent finds what a crash left.
        marker = ChildMarker(config.agent.node, str(config.agent.state_file), os.getpid())
        self.supervisor = Supervisor(ring_lines=config.agent.log_ring_lines, marker=marker)
        self.overrides = EnabledOverrides(config.agent.state_file)
        self.registry = CollectorRegistry()
        self.registry.register(SupervisorCollector(self.supervisor))
        self.reloads = Counter("llamanap_agent_reloads", "Config reloads by result (ok, error)",
                               ["result"], registry=self.registry)
        self.last_reload: ReloadRecord | None = None
        self.api_urls: list[str] = []
        self._reload_listeners: list[ReloadListener] = []  # the components' on_reload
        self._scheduler: OnDemandService | None = None  # starts of on-demand instances
        self._shutdown = trio.Event()

    def __repr__(self) -> str:
        return f"<Agent {self.config.agent.node} {self.cfg_path} api={self.api_urls} {self.supervisor!r}>"

    async def apply_config(self, reason: str) -> ReloadPlan:
        """Bring the supervisor in line with ``self.config`` (and the enable overrides)."""
        instances = self.config.instances
        return await self.supervisor.apply(instances, self.overrides.effective(instances), reason)

    async def reload(self, reason: str = "reload") -> ReloadPlan:
        """Re-read the config and act on the difference; a bad config changes nothing.

        Raises ``ConfigError`` (after recording it in ``last_reload``) when the config is bad.
        """
        systemd.reloading()
        try:
            try:
                new = load_node_config(self.cfg_path)
            except LlamanapError as exc:
                self.last_reload = ReloadRecord(False, str(exc), _wall())
                self.reloads.labels("error").inc()
                log.error("%s: config error, keeping the running instances: %s", reason, exc)
                raise
            if new.agent != self.config.agent:
                log.warning("%s: [agent] settings changed; restart node-agent to apply them "
                            "(instances are reloaded now)", reason)
            # The [agent] section (API address, token, state file) is fixed while running.
            self.config = dataclasses.replace(new, agent=self.config.agent)
            plan = await self.apply_config(reason)
            self.last_reload = ReloadRecord(True, _summary(plan), _wall())
            self.reloads.labels("ok").inc()
            for listener in self._reload_listeners:
                listener(self.config)
            return plan
        finally:
            systemd.ready()

    def add_reload_listener(self, listener: ReloadListener) -> None:
        """Call ``listener(config)`` after each successful reload."""
        self._reload_listeners.append(listener)

    def summary(self) -> dict[str, Any]:
        """What ``GET /v1/status`` says about the agent itself."""
        last = self.last_reload
        return {"node": self.config.agent.node, "config": str(self.cfg_path),
                "api": self.api_urls,
                "last_reload": None if last is None else {"ok": last.ok, "message": last.message,
                                                          "at": last.at}}

    def set_enabled(self, name: str, enabled: bool, reason: str) -> None:
        """Persist an enable/disable (state file) and start or stop the instance to match."""
        cfg = self.config.instances[name]
        self.overrides.set(name, enabled, cfg.enabled)
        self.supervisor.set_enabled(name, enabled, reason)

    def schedule_starts(self, scheduler: OnDemandService) -> None:
        """Starts of ``load = "on-demand"`` instances go through ``scheduler`` from now on."""
        self._scheduler = scheduler

    async def start(self, name: str, reason: str) -> None:
        """Start instance ``name``: an on-demand one as the scheduler decides (it evicts idle
        models, waits, or raises ``LoadRefused``), any other one at once."""
        cfg = self.config.instances.get(name)
        if self._scheduler is not None and cfg is not None and cfg.load == "on-demand":
            await self._scheduler.load_instance(name, until_ready=False)
        else:
            self.supervisor.start(name, reason)

    def request_shutdown(self) -> None:
        self._shutdown.set()

    async def wait_shutdown(self) -> None:
        await self._shutdown.wait()


@dataclass
class Parts:
    """The agent's components, built and wired by ``build_parts``."""

    activity: ActivityService
    pstates: PstateService
    placement: PlacementService
    power: PowerService
    ondemand: OnDemandService
    report: ReportService

    def components(self) -> list[Component]:
        """In start order: activity and P-states run before power may release them."""
        return [self.activity, self.pstates, self.placement, self.power, self.ondemand,
                self.report]


def build_parts(agent: Agent, *, inventory: GpuInventory | None = None,
                backend: PstateBackend | None = None, suspend: SuspendAction | None = None,
                watch_system: bool = True) -> Parts:
    """Build every component for ``agent`` and subscribe them to its supervisor.

    Pass hardware fakes (an inventory, a P-state backend, a suspend action) in a test; ``watch_system=False`` ignores logind and the clock for resumes.
    """
    sup, config = agent.supervisor, agent.config
    gpus = inventory if inventory is not None else open_inventory()  # shared by P-states, placement
    activity = ActivityService(sup)
    placement = PlacementService(gpus, config.placement.safety_margin_mib)
    ondemand = OnDemandService(sup, config, busy=activity.busy, gpus=gpus.snapshot)
    pstates = PstateService(sup, activity, gpus, backend if backend is not None else NvapiBackend(),
                            config.pstate, watch_foreign=config.power.watch_foreign_gpu_processes,
                            estimates=ondemand.estimates, reported=placement.reported)
    agent.schedule_starts(ondemand)
    power = PowerService(config, sup, activity=activity, gpu=pstates,
                         pstates=pstates.controller, suspend=suspend, watch_system=watch_system,
                         scheduler=ondemand)
    ondemand.announce = power.announce_unloading  # the proxy hears of a stop before it
    activity.add_listener(ondemand.on_busy)
    report = ReportService(config.agent.node, config.proxy, config.report, gpus,
                           wanted=lambda: {g["uuid"]: g["pstate_wanted"]
                                           for g in pstates.gpu_status()["gpus"]},
                           cycles=lambda: power.manager.history,
                           busy_gpus=pstates.controller.busy_gpus)
    activity.add_listener(report.on_busy)  # after the controller's: both read the same edge
    sup.add_line_sink(activity.feed)
    sup.add_line_sink(placement.feed)
    for listener in (activity.on_state, pstates.on_state, placement.on_state, power.on_state,
                     ondemand.on_state, report.on_state):
        sup.add_state_listener(listener)
    # The supervisor's one planner hook, set before it starts anything.
    sup.launch_planner = placement.placer
    return Parts(activity, pstates, placement, power, ondemand, report)


def default_components(agent: Agent) -> list[Component]:
    """The agent's parts beside the supervisor and the API, in start order."""
    return build_parts(agent).components()


ComponentFactory = Callable[[Agent], Sequence[Component]]


async def run_agent(
    cfg_path: Path,
    *,
    handle_signals: bool = True,
    make_components: ComponentFactory | None = None,
    task_status: trio.TaskStatus[Agent] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the node-agent from ``cfg_path`` until SIGTERM/SIGINT or cancellation.

    ``task_status`` receives the ``Agent`` once the API listens and the enabled instances
    are starting (not yet READY: a big model may load for minutes). ``make_components``
    replaces ``default_components`` (tests build them with hardware fakes).
    """
    path = Path(cfg_path).absolute()
    config = load_node_config(path)
    agent = Agent(path, config)
    listen = parse_hostport(config.agent.api_listen, Context(path), "agent.api_listen",
                            allow_port_zero=True)
    if listen.port != 0 and (problem := port_problem(listen.host, listen.port)):
        # Checked before anything starts, so a second agent on the same box fails in one line.
        raise LlamanapError(f"{path}: agent.api_listen: {problem}")
    components = list((make_components or default_components)(agent))
    registrars = [api.core_routes(agent.supervisor, agent, agent.registry)]
    for component in components:
        registrars.append(component.routes)
        for collector in component.collectors():
            agent.registry.register(collector)
        agent.add_reload_listener(component.on_reload)
    async with trio.open_nursery() as nursery:
        await nursery.start(agent.supervisor.run)
        for component in components:
            await nursery.start(component.run)
        app = api.build_app(config.agent.token, registrars)
        agent.api_urls = await nursery.start(serve, app, listen)
        if handle_signals:
            await nursery.start(_handle_signals, agent)
        interval = systemd.watchdog_interval_s()
        if interval is not None:
            nursery.start_soon(_watchdog, interval)
        await agent.apply_config("agent start")
        log.info("node-agent %s listening on %s with %d instance(s)", config.agent.node,
                 ", ".join(agent.api_urls), len(config.instances))
        systemd.ready(f"{len(config.instances)} instance(s)")
        task_status.started(agent)
        await agent.wait_shutdown()
        systemd.stopping()
        log.info("stopping: stopping every instance")
        budget = max((i.stop_timeout_s for i in agent.config.instances.values()), default=0.0)
        with trio.move_on_after(budget + SHUTDOWN_MARGIN_S):
            await agent.supervisor.stop_all("node-agent stopping")
        nursery.cancel_scope.cancel()


async def _handle_signals(agent: Agent, *, task_status: trio.TaskStatus[None]) -> None:
    with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()  # from here on a SIGHUP reloads instead of killing the agent
        async for signum in signals:
            if signum == signal.SIGHUP:
                # A config error is logged and kept in last_reload; the running set stays.
                with contextlib.suppress(LlamanapError):
                    await agent.reload("SIGHUP reload")
            else:
                log.info("got %s", signal.Signals(signum).name)
                agent.request_shutdown()


async def _watchdog(interval_s: float) -> None:
    while True:
        systemd.watchdog()
        await trio.sleep(interval_s)


def _summary(plan: ReloadPlan) -> str:
    parts = [f"{k} {', '.join(v)}" for k, v in plan.to_json().items() if v and k != "unchanged"]
    return "; ".join(parts) or "no instance changed"


def _wall() -> float:
    return time.time()
