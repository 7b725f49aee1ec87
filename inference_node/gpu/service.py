"""P-state control as a node-agent component, and the GPU side of instance activity.

``PstateService(instances, activity, inventory, backend, settings)`` runs the P-state
controller over the GPUs of the inventory, from the busy/idle edges of ``activity`` (the
agent's one ``ActivityService``). Its ``on_state`` (a supervisor state listener, wired by the
agent's root) learns each instance's GPUs from the environment its child starts with
(``CUDA_VISIBLE_DEVICES`` under ``CUDA_DEVICE_ORDER=PCI_BUS_ID``) and forgets them when the
child ends. It offers ``GET /v1/gpus`` and ``GET /v1/activity`` (activity beside each
instance's GPUs), the Prometheus series of both, and takes ``[pstate]`` on a reload.

A GPU on which NVML lists a compute process outside the instances' process trees (a training
job, a notebook) is treated as busy: the agent never slows down work it did not start.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Final

import trio

from inference_node.activity.service import ENDED, ActivityView, InstanceSource
from inference_node.gpu.assign import GpuAssignment, check_processes, gpus_for_env
from inference_node.gpu.backend import PstateBackend
from inference_node.gpu.controller import PstateController
from inference_node.gpu.inventory import GpuInfo, GpuInventory
from inference_node.gpu.memory import gpu_memory
from inference_node.gpu.metrics import GpuActivityCollector
from inference_node.process_tree import with_descendants
from inference_node.supervisor.state import State
from shared.config.node import NodeAgentConfig, PstateSection
from shared.http import App, Request, Response

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from prometheus_client.registry import Collector

    from inference_node.placement.measured import MeasuredMemory

    Estimates = Callable[[], Mapping[str, Mapping[str, float]]]
    Reported = Callable[[], Mapping[str, MeasuredMemory]]

log = logging.getLogger(__name__)

# NVML's compute process list is checked against the assignment this often (cheap, and a
# wrong mapping only matters while the instance works).
PROCESS_CHECK_INTERVAL_S: Final = 30.0


class PstateService:
    """Component: per-GPU P-states from instance activity, and the status of both."""

    def __init__(self, instances: InstanceSource, activity: ActivityView,
                 inventory: GpuInventory, backend: PstateBackend, settings: PstateSection, *,
                 watch_foreign: bool = True, estimates: Estimates = dict,
                 reported: Reported = dict) -> None:
        """``estimates`` and ``reported``: MiB per device of each instance, by the
        scheduler's estimate and by its llama-server's buffer lines (the GPU status sums
        them per GPU)."""
        self.instances = instances
        self.estimates = estimates
        self.reported = reported
        self.activity = activity
        self.inventory = inventory
        self.controller = PstateController(
            inventory, backend, activity, low=settings.low, high=settings.high,
            low_delay_s=settings.low_delay_s, enabled=settings.enabled,
            held_by_others=self.held_by_others if watch_foreign else None)
        self.assignments: dict[str, GpuAssignment] = {}
        self.gpu_problems: dict[str, list[str]] = {}
        self._foreign_seen: dict[str, list[int]] = {}

    def __repr__(self) -> str:
        return f"<PstateService gpus={len(self.controller.gpus())} {self.controller!r}>"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the controller and the process check until cancelled (forced P-states are
        released on the way out)."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.controller.run)
            nursery.start_soon(self._process_check_loop)
            task_status.started()

    # -- inputs -----------------------------------------------------------------------------

    def on_state(self, name: str, old: State, new: State, reason: str) -> None:
        """State listener: learn an instance's GPUs when its child starts; forget them when
        it ends."""
        if new is State.STARTING:
            launch = self.instances.get(name).launch
            if launch is None:
                return
            assignment = gpus_for_env(launch.env, self.controller.gpus())
            self.assignments[name] = assignment
            for problem in assignment.problems:
                log.warning("instance %s: %s", name, problem)
            self.controller.set_instance_gpus(name, assignment.gpus)
        elif new in ENDED:
            self.controller.forget_instance(name)

    def on_reload(self, config: NodeAgentConfig) -> None:
        """Take the new ``[pstate]`` settings."""
        p = config.pstate
        self.controller.configure(low=p.low, high=p.high, low_delay_s=p.low_delay_s,
                                  enabled=p.enabled)

    # -- what other parts read --------------------------------------------------------------

    def instance_pids(self) -> list[int]:
        """Pids of every running instance's own process (not of their children)."""
        return [row.pid for row in self.instances.snapshot() if row.pid is not None]

    async def held_by_others(self, gpus: list[GpuInfo]) -> set[str]:
        """GPUs (UUIDs) on which NVML lists a compute process that is not one of ours."""
        roots = self.instance_pids()
        listed = {p.pid for g in gpus for p in g.processes}
        ours = set(roots)
        if listed - ours:
            # only then: walking the process tree reads /proc/PID/stat of every process, and
            # this runs at every inventory refresh
            ours = await trio.to_thread.run_sync(with_descendants, roots)
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

    def gpu_processes(self) -> list[tuple[int, str]]:
        """``(pid, GPU UUID)`` of every compute process NVML saw at the last refresh."""
        return [(p.pid, g.uuid) for g in self.controller.gpus() for p in g.processes]

    # -- status -----------------------------------------------------------------------------

    def activity_status(self) -> dict[str, Any]:
        """Activity of every instance, with the GPUs it runs on and any doubt about them."""
        status = self.activity.status(trio.current_time())
        for name, entry in status["instances"].items():
            assignment = self.assignments.get(name)
            entry["gpus"] = list(assignment.gpus) if assignment else []
            entry["gpu_source"] = assignment.source if assignment else None
            entry["gpu_problems"] = [*(assignment.problems if assignment else ()),
                                     *self.gpu_problems.get(name, [])]
        return status

    def gpu_status(self) -> dict[str, Any]:
        """The controller's status, and per GPU what is loaded on it: ``estimated_mib``,
        ``reported_mib`` (None where unknown) and ``empty`` (no instance of the agent's
        and no other program on it)."""
        status = self.controller.status(trio.current_time())
        running = {n for g in status["gpus"] for n in g["instances"]}
        placed = {n: self.assignments[n].gpus for n in running if n in self.assignments}
        memory = gpu_memory([g["uuid"] for g in status["gpus"]], placed, self.estimates(),
                            self.reported())
        for g in status["gpus"]:
            m = memory[g["uuid"]]
            g["estimated_mib"] = None if m.estimated_mib is None else round(m.estimated_mib, 1)
            g["reported_mib"] = None if m.reported_mib is None else round(m.reported_mib, 1)
            g["empty"] = not g["instances"] and not g["used_by_other_programs"]
        return status

    def routes(self, app: App) -> None:
        """``GET /v1/gpus`` and ``GET /v1/activity``."""

        @app.route("GET", "/v1/gpus")
        async def gpus(req: Request) -> Response:
            return Response.json(self.gpu_status())

        @app.route("GET", "/v1/activity")
        async def activity(req: Request) -> Response:
            return Response.json(self.activity_status())

    def collectors(self) -> list[Collector]:
        return [GpuActivityCollector(self.gpu_status, self.activity_status)]

    async def _process_check_loop(self) -> None:
        while True:
            await trio.sleep(PROCESS_CHECK_INTERVAL_S)
            self.check_processes()

    def check_processes(self) -> None:
        """Compare NVML's compute processes with each running instance's GPUs; log news."""
        gpus = self.controller.gpus()
        for row in self.instances.snapshot():
            assignment = self.assignments.get(row.name)
            if row.pid is None or assignment is None:
                continue
            problems = check_processes(assignment, [row.pid], gpus)
            if problems != self.gpu_problems.get(row.name, []):
                for problem in problems:
                    log.warning("instance %s: %s", row.name, problem)
            self.gpu_problems[row.name] = problems
