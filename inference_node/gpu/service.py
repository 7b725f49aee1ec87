"""Activity tracking, the /slots check and P-state control, plugged into the node-agent.

``GpuActivityService(supervisor, config.pstate)`` subscribes to the supervisor in its
constructor: its tracker is a line sink (every line of every instance), and a state listener
learns each instance's GPUs from the environment its child starts with (``CUDA_VISIBLE_DEVICES``
under ``CUDA_DEVICE_ORDER=PCI_BUS_ID``) and forgets its activity when the child ends. ``run``
runs the P-state controller and the /slots check; ``routes`` adds ``GET /v1/gpus`` and
``GET /v1/activity``; ``collector`` gives the Prometheus series. ``attach(agent)`` does all of
that for a node-agent (``run_agent``'s ``make_components`` can pass hardware fakes to it).

A GPU on which NVML lists a compute process outside the instances' process trees (a training
job, a notebook) is treated as busy: the agent never slows down work it did not start.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Final

import psutil
import trio

from inference_node.activity.reconcile import SLOTS_CHECK_INTERVAL_S, SlotsReconciler
from inference_node.activity.tracker import BusyTracker
from inference_node.gpu.assign import GpuAssignment, check_processes, gpus_for_env
from inference_node.gpu.backend import PstateBackend
from inference_node.gpu.controller import PstateController
from inference_node.gpu.inventory import GpuInfo, GpuInventory, open_inventory
from inference_node.gpu.metrics import GpuActivityCollector
from inference_node.gpu.nvapi import NvapiBackend
from inference_node.supervisor import State, Supervisor
from shared.config.node import NodeAgentConfig, PstateSection
from shared.http import App, Request, Response

if TYPE_CHECKING:
    from inference_node.agent import Agent

log = logging.getLogger(__name__)

# An instance whose child ended runs no task any more.
_ENDED: Final = frozenset({State.STOPPED, State.BACKOFF, State.FAILED})
# NVML's compute process list is checked against the assignment this often (cheap, and a
# wrong mapping only matters while the instance works).
PROCESS_CHECK_INTERVAL_S: Final = 30.0


def attach(agent: Agent, *, inventory: GpuInventory | None = None,
           backend: PstateBackend | None = None) -> GpuActivityService:
    """Build the service for ``agent`` and plug it in: ``agent.gpu_activity``, its API routes,
    its metrics and its reload listener. Pass hardware fakes for a demo or a test."""
    service = GpuActivityService(
        agent.supervisor, agent.config.pstate, inventory=inventory, backend=backend,
        watch_foreign=agent.config.power.watch_foreign_gpu_processes)
    agent.gpu_activity = service
    agent.route_registrars.append(service.routes)
    agent.registry.register(service.collector())
    agent.reload_listeners.append(service.on_reload)
    return service


class GpuActivityService:
    """Busy/idle per instance, per-GPU P-states, and the status of both."""

    def __init__(self, supervisor: Supervisor, config: PstateSection, *,
                 inventory: GpuInventory | None = None, backend: PstateBackend | None = None,
                 slots_interval_s: float = SLOTS_CHECK_INTERVAL_S,
                 watch_foreign: bool = True) -> None:
        self.supervisor = supervisor
        self.tracker = BusyTracker()
        self.inventory = inventory if inventory is not None else open_inventory()
        self.controller = PstateController(
            self.inventory, backend if backend is not None else NvapiBackend(), self.tracker,
            low=config.low, high=config.high, low_delay_s=config.low_delay_s,
            enabled=config.enabled, held_by_others=self.held_by_others if watch_foreign else None)
        self.reconciler = SlotsReconciler(self.tracker, self.endpoints, interval_s=slots_interval_s)
        self.assignments: dict[str, GpuAssignment] = {}
        self.gpu_problems: dict[str, list[str]] = {}
        self._foreign_seen: dict[str, list[int]] = {}
        supervisor.add_line_sink(self.tracker.feed)
        supervisor.add_state_listener(self.on_state)

    def __repr__(self) -> str:
        return (f"<GpuActivityService gpus={len(self.controller.gpus())} "
                f"busy={self.tracker.busy_instances()}>")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the controller and the checks until cancelled (forced P-states are released)."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.controller.run)
            await nursery.start(self.reconciler.run)
            nursery.start_soon(self._process_check_loop)
            task_status.started()

    # -- supervisor listeners -------------------------------------------------------------------

    def on_state(self, name: str, old: State, new: State, reason: str) -> None:
        """Learn an instance's GPUs when its child starts; forget its tasks when it ends."""
        now = trio.current_time()
        if new is State.STARTING:
            self.tracker.reset(name, now)  # a new child runs nothing yet
            launch = self.supervisor.get(name).launch
            if launch is None:
                return
            assignment = gpus_for_env(launch.env, self.controller.gpus())
            self.assignments[name] = assignment
            for problem in assignment.problems:
                log.warning("instance %s: %s", name, problem)
            self.controller.set_instance_gpus(name, assignment.gpus)
        elif new in _ENDED:
            self.tracker.reset(name, now)
            self.controller.forget_instance(name)

    def on_reload(self, config: NodeAgentConfig) -> None:
        """Reload listener: take the new ``[pstate]`` settings."""
        p = config.pstate
        self.controller.configure(low=p.low, high=p.high, low_delay_s=p.low_delay_s,
                                  enabled=p.enabled)

    def endpoints(self) -> dict[str, str]:
        """Base URLs of the READY instances (for /slots and /metrics)."""
        urls: dict[str, str] = {}
        for row in self.supervisor.snapshot():
            if row.state is not State.READY:
                continue
            launch = self.supervisor.get(row.name).launch
            if launch is not None:
                host = launch.probe_host
                urls[row.name] = f"http://{f'[{host}]' if ':' in host else host}:{launch.port}"
        return urls

    def own_pids(self) -> set[int]:
        """Pids of every running instance and of their descendants (a wrapper script's child
        is the process CUDA sees)."""
        pids: set[int] = set()
        for row in self.supervisor.snapshot():
            if row.pid is None:
                continue
            pids.add(row.pid)
            try:
                pids.update(p.pid for p in psutil.Process(row.pid).children(recursive=True))
            except psutil.Error:
                continue  # exited meanwhile
        return pids

    def held_by_others(self, gpus: list[GpuInfo]) -> set[str]:
        """GPUs (UUIDs) on which NVML lists a compute process that is not one of ours."""
        ours = self.own_pids()
        foreign = {g.pci_bus_id: sorted(p.pid for p in g.processes if p.pid not in ours)
                   for g in gpus}
        foreign = {bus: pids for bus, pids in foreign.items() if pids}
        if foreign != self._foreign_seen:
            for bus, pids in sorted(foreign.items()):
                log.info("GPU %s: compute processes the agent did not start: pid %s; it is "
                         "not forced low while they run (power.watch_foreign_gpu_processes = "
                         "false turns this off, e.g. when the agent runs in a PID namespace)",
                         bus, ", ".join(map(str, pids)))
            self._foreign_seen = foreign
        return {g.uuid for g in gpus if g.pci_bus_id in foreign}

    def tasks_in_progress(self) -> dict[str, int]:
        """``{instance: busy slots}`` (what the power manager's busy check reads)."""
        return {name: len(self.tracker.instance(name).active) for name in self.tracker.names()}

    def gpu_processes(self) -> list[tuple[int, str]]:
        """``(pid, GPU UUID)`` of every compute process NVML saw at the last refresh."""
        return [(p.pid, g.uuid) for g in self.controller.gpus() for p in g.processes]

    # -- status ---------------------------------------------------------------------------------

    def activity_status(self) -> dict[str, Any]:
        now = trio.current_time()
        instances = self.tracker.status(now)
        for name, entry in instances.items():
            assignment = self.assignments.get(name)
            entry["gpus"] = list(assignment.gpus) if assignment else []
            entry["gpu_source"] = assignment.source if assignment else None
            entry["gpu_problems"] = [*(assignment.problems if assignment else ()),
                                     *self.gpu_problems.get(name, [])]
        return {"instances": instances, "slots_checks": self.reconciler.checks}

    def gpu_status(self) -> dict[str, Any]:
        return self.controller.status(trio.current_time())

    def routes(self, app: App, agent: Agent) -> None:
        """Route registrar: ``GET /v1/gpus`` and ``GET /v1/activity``."""

        @app.route("GET", "/v1/gpus")
        async def gpus(req: Request) -> Response:
            return Response.json(self.gpu_status())

        @app.route("GET", "/v1/activity")
        async def activity(req: Request) -> Response:
            return Response.json(self.activity_status())

    def collector(self) -> GpuActivityCollector:
        return GpuActivityCollector(self.gpu_status, self.activity_status)

    async def _process_check_loop(self) -> None:
        while True:
            await trio.sleep(PROCESS_CHECK_INTERVAL_S)
            self.check_processes()

    def check_processes(self) -> None:
        """Compare NVML's compute processes with each running instance's GPUs; log news."""
        gpus = self.controller.gpus()
        for row in self.supervisor.snapshot():
            assignment = self.assignments.get(row.name)
            if row.pid is None or assignment is None:
                continue
            problems = check_processes(assignment, [row.pid], gpus)
            if problems != self.gpu_problems.get(row.name, []):
                for problem in problems:
                    log.warning("instance %s: %s", row.name, problem)
            self.gpu_problems[row.name] = problems
