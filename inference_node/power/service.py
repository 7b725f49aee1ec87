"""The power component of the agent: builds the checks and the manager from config, adds the
``/v1/power`` routes (status, the sleep hook's ``pre``/``post``, inhibits).

It gets what its checks read (instance activity, the GPUs' compute processes), the
supervisor's start/stop and the P-state release from the agent's root; a reload hands the
manager its new settings (``PowerManager.reconfigure``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

import trio

from inference_node.activity.service import ActivityView
from inference_node.errors import ProxyUnreachable
from inference_node.power.announce import served_models
from inference_node.power.checks import (
    ApiInhibitCheck,
    Check,
    CommandCheck,
    ConnectionsCheck,
    ForeignGpuProcessCheck,
    InhibitorLockCheck,
    InhibitRegistry,
    InstanceBusyCheck,
    InstanceStartingCheck,
    LoggedInUsersCheck,
)
from inference_node.power.held_first import HeldFirst, Scheduler
from inference_node.power.manager import InstanceControl, PowerManager, PstateRelease
from inference_node.power.proxy_addresses import ProxyAddresses, proxy_hosts
from inference_node.power.proxy_client import ProxyClient
from inference_node.power.suspend import CommandSuspend, SuspendAction
from inference_node.supervisor.state import State
from inference_node.supervisor.supervisor import autostarts
from shared.config.node import NodeAgentConfig, PowerSection
from shared.http import HTTPError, Request, Response

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

    from inference_node.supervisor import InstanceStatus
    from shared.http import App

log = logging.getLogger(__name__)

MAX_INHIBIT_S = 7 * 86400.0  # an inhibit longer than a week is a mistake, not a plan
# A reason is read in status lines and logs: a sentence, not a document.
MAX_INHIBIT_REASON_CHARS = 200
# How long an instance's stop waits for the proxy to take its ``unloading`` event.
UNLOADING_WAIT_S = 2.0


class GpuProcesses(Protocol):
    """What the foreign-process check reads (the P-state service offers it)."""

    def gpu_processes(self) -> list[tuple[int, str]]:
        """``(pid, GPU UUID)`` of every compute process NVML saw last."""
        ...

    def instance_pids(self) -> Iterable[int]:
        """Pids of the running instances (their descendants are ours too)."""
        ...


class Instances(InstanceControl, Protocol):
    """What power uses of the supervisor: stop and start them all, and see who is starting."""

    def lift_hold(self) -> None:
        """Let starts happen again after ``stop_all`` without starting anything."""
        ...

    def snapshot(self) -> list[InstanceStatus]:
        """One row per instance, with its state."""
        ...


def build_checks(config: NodeAgentConfig, registry: InhibitRegistry, instances: Instances, *,
                 activity: ActivityView | None, gpu: GpuProcesses | None) -> list[Check]:
    """The checks ``[power]`` asks for, fed from the agent's own parts."""
    cfg = config.power
    checks: list[Check] = [ApiInhibitCheck(registry), InstanceStartingCheck(lambda: [
        row.name for row in instances.snapshot() if row.state is State.STARTING])]
    if activity is not None:
        checks.append(InstanceBusyCheck(activity.tasks_in_progress))
    if gpu is not None and cfg.watch_foreign_gpu_processes:
        checks.append(ForeignGpuProcessCheck(gpu.gpu_processes, gpu.instance_pids))
    if cfg.watch_connections:
        ports = [i.effective_port for i in config.instances.values() if i.enabled]
        checks.append(ConnectionsCheck(lambda: ports, ProxyAddresses(proxy_hosts(config))))
    if cfg.watch_logged_in_users:
        checks.append(LoggedInUsersCheck())
    if cfg.watch_inhibitor_locks:
        checks.append(InhibitorLockCheck())
    if cfg.busy_argv is not None:
        checks.append(CommandCheck(cfg.busy_argv))
    return checks


def command_suspend(power: PowerSection) -> CommandSuspend:
    """The configured suspend command (``systemctl suspend`` by default)."""
    return CommandSuspend(power.suspend_argv, power.suspend_command_timeout_s)


class PowerService:
    """Component: the idle policy loop and the suspend/resume sequence."""

    def __init__(self, config: NodeAgentConfig, instances: Instances, *,
                 activity: ActivityView | None = None, gpu: GpuProcesses | None = None,
                 pstates: PstateRelease | None = None, suspend: SuspendAction | None = None,
                 watch_system: bool = True, scheduler: Scheduler | None = None) -> None:
        """``suspend`` replaces the configured suspend command (a test's); with a proxy, a
        resume starts what it holds requests for first, through ``scheduler``."""
        self.instances = instances
        self.activity = activity
        self.gpu = gpu
        self.inhibits = InhibitRegistry()
        self._fixed_suspend = suspend is not None
        self._instances_cfg = config.instances  # what the model ids are read from
        proxy = ProxyClient(config.proxy, config.agent.node, self._models) \
            if config.proxy else None
        first = None if proxy is None or scheduler is None else \
            HeldFirst(proxy, scheduler, instances.lift_hold)
        self.manager = PowerManager(
            config.power, self._checks(config), instances,
            suspend or command_suspend(config.power), proxy=proxy,
            pstates=pstates, resume_timeout_s=config.power.resume_timeout_s,
            watch_system=watch_system, starting=self._starting, first=first)

    def __repr__(self) -> str:
        return f"<PowerService {self.manager.machine!r}>"

    async def announce_unloading(self, instances: Iterable[str], reason: str) -> None:
        """Tell the proxy these instances stop now, so it sends their models no new request
        (at most ``UNLOADING_WAIT_S``; without a proxy, or when it cannot be told, the stop
        goes ahead and the proxy finds out by a refused connection)."""
        proxy = self.manager.proxy
        if proxy is None:
            return
        names = tuple(instances)
        with trio.move_on_after(UNLOADING_WAIT_S) as waited:
            try:
                await proxy.send("unloading", reason, unloading=names)
            except ProxyUnreachable as exc:
                log.warning("power: could not tell the proxy that %s stop: %s (requests for "
                            "their models find out by a refused connection)",
                            ", ".join(names), exc)
        if waited.cancelled_caught:
            log.warning("power: the proxy did not take the unloading of %s within %g s; "
                        "stopping them anyway", ", ".join(names), UNLOADING_WAIT_S)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await self.manager.run(task_status=task_status)
        finally:
            if self.manager.proxy is not None:
                with trio.CancelScope(shield=True):
                    await self.manager.proxy.aclose()

    def on_state(self, instance: str, old: State, new: State, reason: str) -> None:
        """State listener: READY instances are announced to the proxy while resuming."""
        self.manager.on_instance_state(instance, old, new, reason)

    def on_reload(self, config: NodeAgentConfig) -> None:
        """Hand the manager the new ``[power]`` settings and the checks built from them."""
        power = config.power
        self._instances_cfg = config.instances
        suspend = None if self._fixed_suspend else command_suspend(power)
        self.manager.reconfigure(power, self._checks(config), suspend)
        proxy = self.manager.proxy
        if (config.proxy is None) != (proxy is None) or (
                config.proxy is not None and proxy is not None and config.proxy != proxy.cfg):
            log.warning("reload: [proxy] changed; restart node-agent to apply it")

    def _models(self) -> tuple[str, ...]:
        """The ids the node serves now (its enabled instances), sent with every event; from
        config until the supervisor has the instances (at agent start)."""
        rows = self.instances.snapshot()
        enabled = [row.name for row in rows if row.enabled] if rows else \
            [name for name, cfg in self._instances_cfg.items() if cfg.enabled]
        return served_models(self._instances_cfg, enabled)

    def _starting(self) -> list[str]:
        """The instances the agent starts by itself, from config (the start announcement
        waits for them before the supervisor has them)."""
        return [name for name, cfg in self._instances_cfg.items()
                if cfg.enabled and autostarts(cfg)]

    def collectors(self) -> list[Collector]:
        return []

    def _checks(self, config: NodeAgentConfig) -> list[Check]:
        return build_checks(config, self.inhibits, self.instances, activity=self.activity,
                            gpu=self.gpu)

    def status(self) -> dict[str, Any]:
        now = trio.current_time()
        return self.manager.status() | {"inhibits": [
            {"id": i.id, "reason": i.reason, "remaining_s": round(i.until - now, 1)}
            for i in self.inhibits.active(now)]}

    def routes(self, app: App) -> None:
        """``GET /v1/power``, ``POST /v1/power/hook``, ``POST|DELETE /v1/power/inhibit``."""

        @app.route("GET", "/v1/power")
        async def power(req: Request) -> Response:
            return Response.json(self.status())

        @app.route("POST", "/v1/power/hook")
        async def hook(req: Request) -> Response:
            body = req.json()
            phase = body.get("phase") if isinstance(body, dict) else None
            if phase not in ("pre", "post"):
                raise HTTPError(400, f"phase: found {phase!r}; allowed: 'pre', 'post'")
            return Response.json({"phase": phase, "result": self.manager.hook(phase)})

        @app.route("POST", "/v1/power/inhibit")
        async def inhibit(req: Request) -> Response:
            body = req.json()
            if not isinstance(body, dict):
                raise HTTPError(400, "expected a JSON object with reason and for_s")
            reason, for_s = body.get("reason"), body.get("for_s")
            if not isinstance(reason, str) or not reason.strip():
                raise HTTPError(400, "reason: expected a non-empty string saying why")
            reason = reason.strip()
            if len(reason) > MAX_INHIBIT_REASON_CHARS or not reason.isprintable():
                found = f"{len(reason)} characters" if len(reason) > MAX_INHIBIT_REASON_CHARS \
                    else "a line break or control character"
                raise HTTPError(400, f"reason: found {found}; allowed: one line of up to "
                                f"{MAX_INHIBIT_REASON_CHARS} characters")
            if not isinstance(for_s, int | float) or isinstance(for_s, bool) or not 0 < for_s <= MAX_INHIBIT_S:
                raise HTTPError(400, f"for_s: found {for_s!r}; allowed: seconds, up to {MAX_INHIBIT_S:.0f}")
            item = self.inhibits.add(reason, float(for_s), trio.current_time())
            await self.manager.refresh_verdict()  # `node-agent power` shows it at once
            return Response.json({"id": item.id, "reason": item.reason, "for_s": for_s})

        @app.route("DELETE", "/v1/power/inhibit/{id}")
        async def uninhibit(req: Request) -> Response:
            raw = req.params["id"]
            if not raw.isdigit() or not self.inhibits.remove(int(raw)):
                raise HTTPError(404, f"no inhibit with id {raw}; `node-agent inhibit --list` shows them",
                                "not_found_error")
            self.manager.poke()
            return Response.json({"removed": int(raw)})
