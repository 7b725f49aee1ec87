"""The power component of the agent: builds the checks and the manager from config, adds the
``/v1/power`` routes (status, the sleep hook's ``pre``/``post``, inhibits)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio

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
from inference_node.power.manager import CommandSuspend, PowerManager, PstateRelease, SuspendAction
from inference_node.power.proxy_client import ProxyClient
from inference_node.supervisor.state import State
from shared.config.node import NodeAgentConfig, PowerSection
from shared.http import HTTPError, Request, Response

if TYPE_CHECKING:
    from inference_node.agent import Agent
    from shared.http import App

log = logging.getLogger(__name__)

MAX_INHIBIT_S = 7 * 86400.0  # an inhibit longer than a week is a mistake, not a plan
# A reason is read in status lines and logs: a sentence, not a document.
MAX_INHIBIT_REASON_CHARS = 200


def build_checks(agent: Agent, registry: InhibitRegistry) -> list[Check]:
    """The checks ``[power]`` asks for, fed from the agent's own parts."""
    cfg = agent.config.power
    gpu = agent.gpu_activity
    checks: list[Check] = [ApiInhibitCheck(registry), InstanceStartingCheck(lambda: [
        row.name for row in agent.supervisor.snapshot() if row.state is State.STARTING])]
    if gpu is not None:
        checks.append(InstanceBusyCheck(gpu.tasks_in_progress))
        if cfg.watch_foreign_gpu_processes:
            checks.append(ForeignGpuProcessCheck(gpu.gpu_processes, gpu.own_pids))
    if cfg.watch_connections:
        checks.append(ConnectionsCheck(lambda: [
            i.effective_port for i in agent.config.instances.values() if i.enabled]))
    if cfg.watch_logged_in_users:
        checks.append(LoggedInUsersCheck())
    if cfg.watch_inhibitor_locks:
        checks.append(InhibitorLockCheck())
    if cfg.busy_argv is not None:
        checks.append(CommandCheck(cfg.busy_argv))
    return checks


def command_suspend(agent: Agent, power: PowerSection) -> CommandSuspend:
    """The configured suspend command (``systemctl suspend`` by default)."""
    return CommandSuspend(power.suspend_argv, power.suspend_command_timeout_s)


class PowerService:
    """Component: the idle policy loop and the suspend/resume sequence."""

    def __init__(self, agent: Agent, *, suspend: SuspendAction | None = None,
                 watch_system: bool = True) -> None:
        cfg = agent.config
        self.agent = agent
        self.inhibits = InhibitRegistry()
        pstates: PstateRelease | None = agent.gpu_activity.controller if agent.gpu_activity else None
        self.manager = PowerManager(
            cfg.power, build_checks(agent, self.inhibits), agent.supervisor,
            suspend or command_suspend(agent, cfg.power),
            proxy=ProxyClient(cfg.proxy, cfg.agent.node) if cfg.proxy else None,
            pstates=pstates, resume_timeout_s=cfg.power.resume_timeout_s,
            watch_system=watch_system)
        agent.supervisor.add_state_listener(self.manager.on_instance_state)
        agent.route_registrars.append(self.routes)
        agent.reload_listeners.append(self._reloaded)

    def __repr__(self) -> str:
        return f"<PowerService {self.manager.machine!r}>"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await self.manager.run(task_status=task_status)
        finally:
            if self.manager.proxy is not None:
                with trio.CancelScope(shield=True):
                    await self.manager.proxy.aclose()

    def _reloaded(self, config: NodeAgentConfig) -> None:
        power = config.power
        manager = self.manager
        manager.cfg = power
        manager.policy.idle_timeout_s = power.idle_timeout_s
        manager.policy.min_awake_s = power.min_awake_s
        manager.resume_timeout_s = power.resume_timeout_s
        manager.checks = build_checks(self.agent, self.inhibits)
        if isinstance(manager.suspender, CommandSuspend):
            manager.suspender = command_suspend(self.agent, power)
        if (config.proxy is None) != (manager.proxy is None) or (
                config.proxy is not None and manager.proxy is not None
                and config.proxy != manager.proxy.cfg):
            log.warning("reload: [proxy] changed; restart node-agent to apply it")

    def status(self) -> dict[str, Any]:
        now = trio.current_time()
        return self.manager.status() | {"inhibits": [
            {"id": i.id, "reason": i.reason, "remaining_s": round(i.until - now, 1)}
            for i in self.inhibits.active(now)]}

    def routes(self, app: App, agent: Agent) -> None:
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
