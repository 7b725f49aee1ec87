"""Activity of every instance as a service: log-line tracking, the /slots check, and a narrow
read interface for the parts that act on it (P-states, power, later a scheduler).

``ActivityService`` owns the ``BusyTracker`` and the ``SlotsReconciler``. The agent's root
wires it once: ``feed`` is a supervisor line sink and ``on_state`` a state listener (a child
that starts or ends runs no task). Readers get it typed as ``ActivityView``: busy per
instance, tasks in progress, when the last task ended, and listeners on busy/idle edges. Only
this service writes to the tracker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final, Protocol

import trio

from inference_node.activity.reconcile import SLOTS_CHECK_INTERVAL_S, SlotsReconciler
from inference_node.activity.tracker import BusyListener, BusyTracker
from inference_node.supervisor.state import State

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

    from inference_node.supervisor import InstanceStatus
    from inference_node.supervisor.instance import Instance
    from shared.config.node import NodeAgentConfig
    from shared.http import App

# An instance whose child ended runs no task any more.
ENDED: Final = frozenset({State.STOPPED, State.BACKOFF, State.FAILED})


class InstanceSource(Protocol):
    """What activity and P-state code read from the supervisor (the ``Supervisor`` is one)."""

    def snapshot(self) -> list[InstanceStatus]:
        """One row per instance: state, pid, port."""
        ...

    def get(self, name: str) -> Instance:
        """The instance named ``name`` (its ``launch`` says what its child was given)."""
        ...


class ActivityView(Protocol):
    """The read side of activity tracking."""

    def busy(self, instance: str) -> bool:
        """Whether ``instance`` runs a task now."""
        ...

    def tasks_in_progress(self) -> dict[str, int]:
        """``{instance: busy slots}`` of every instance seen so far."""
        ...

    def last_task_end(self, instance: str) -> float | None:
        """Trio time ``instance`` last went idle (None: never busy since the agent started)."""
        ...

    def add_listener(self, listener: BusyListener) -> None:
        """Call ``listener(instance, busy, t)`` synchronously on every busy/idle edge."""
        ...

    def status(self, now: float) -> dict[str, Any]:
        """``{"instances": {name: activity}, "slots_checks": n}``, JSON-ready."""
        ...


def ready_endpoints(instances: InstanceSource) -> dict[str, str]:
    """Base URLs of the READY instances (for /slots and /metrics)."""
    urls: dict[str, str] = {}
    for row in instances.snapshot():
        if row.state is not State.READY:
            continue
        launch = instances.get(row.name).launch
        if launch is not None:
            host = launch.probe_host
            urls[row.name] = f"http://{f'[{host}]' if ':' in host else host}:{launch.port}"
    return urls


class ActivityService:
    """Component: busy/idle per instance from its log, corrected by ``/slots``."""

    def __init__(self, instances: InstanceSource, *,
                 slots_interval_s: float = SLOTS_CHECK_INTERVAL_S) -> None:
        self.tracker = BusyTracker()
        self.reconciler = SlotsReconciler(self.tracker, lambda: ready_endpoints(instances),
                                          interval_s=slots_interval_s)
        self._last_end: dict[str, float] = {}
        self.tracker.add_listener(self._edge)

    def __repr__(self) -> str:
        return f"<ActivityService busy={self.tracker.busy_instances()}>"

    # -- inputs (wired by the agent's root) -----------------------------------------------------

    def feed(self, instance: str, line: str, t: float) -> None:
        """Line sink: one stdout/stderr line of ``instance``, read at trio time ``t``."""
        self.tracker.feed(instance, line, t)

    def on_state(self, name: str, old: State, new: State, reason: str) -> None:
        """State listener: a child that starts, or ends, runs nothing."""
        if new is State.STARTING or new in ENDED:
            self.tracker.reset(name, trio.current_time())

    # -- ActivityView ---------------------------------------------------------------------------

    def busy(self, instance: str) -> bool:
        return self.tracker.busy(instance)

    def tasks_in_progress(self) -> dict[str, int]:
        return {name: len(self.tracker.instance(name).active) for name in self.tracker.names()}

    def last_task_end(self, instance: str) -> float | None:
        return self._last_end.get(instance)

    def add_listener(self, listener: BusyListener) -> None:
        self.tracker.add_listener(listener)

    def status(self, now: float) -> dict[str, Any]:
        return {"instances": self.tracker.status(now), "slots_checks": self.reconciler.checks}

    # -- component ------------------------------------------------------------------------------

    def routes(self, app: App) -> None:
        """No routes of its own: ``GET /v1/activity`` shows it beside each instance's GPUs."""

    def collectors(self) -> list[Collector]:
        return []

    def on_reload(self, config: NodeAgentConfig) -> None:
        """Nothing in the config tunes activity tracking."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the /slots check until cancelled."""
        await self.reconciler.run(task_status=task_status)

    def _edge(self, instance: str, busy: bool, t: float) -> None:
        if not busy:
            self._last_end[instance] = t

