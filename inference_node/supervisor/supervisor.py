"""The supervisor: all instances, their owner tasks, reload by difference, and what others watch.

``Supervisor.run`` is a service: it holds the nursery in which each instance's owner task
lives, and cancelling it stops every child (each owner stops its own, shielded).

Watchers plug in without the supervisor knowing them:

- line sinks ``sink(instance, line, t)`` see every stdout/stderr line of every instance;
- state listeners ``listener(instance, old, new, reason)`` see every transition;
- a launch planner ``async planner(name, config) -> LaunchOverrides | None`` may add args,
  env or GPUs to each start (VRAM placement).

With a ``ChildMarker`` every child is marked in its environment, and ``run`` first stops the
marked processes an earlier run of the same agent left behind (see ``orphans``).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import trio

from inference_node.supervisor.instance import Instance, LaunchPlanner, StateListener
from inference_node.supervisor.launch import LaunchOverrides
from inference_node.supervisor.orphans import ChildMarker, find_orphans, stop_orphan
from inference_node.supervisor.output import LineSink, LogLine
from inference_node.supervisor.state import State
from shared.config.node import InstanceConfig

log = logging.getLogger(__name__)

SETTLED = frozenset({State.STOPPED, State.FAILED})


@dataclass(frozen=True)
class InstanceStatus:
    """One row of ``snapshot()``: what the API, the CLI and the power manager read."""

    name: str
    state: State
    reason: str
    enabled: bool
    pid: int | None
    host: str
    port: int
    gpus: list[int | str] | str | None  # while running: what the child got (placement's pick)
    uptime_s: float | None  # since the current process was spawned
    in_state_s: float
    restarts: int  # automatic restarts (crashes, failed liveness), since the agent started
    last_error: str | None

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name, "state": self.state.value, "reason": self.reason,
            "enabled": self.enabled, "pid": self.pid, "host": self.host, "port": self.port,
            "gpus": self.gpus, "uptime_s": _round(self.uptime_s),
            "in_state_s": _round(self.in_state_s), "restarts": self.restarts,
            "last_error": self.last_error,
        }


@dataclass(frozen=True)
class ReloadPlan:
    """Names by what a reload does to them (pure: computed before anything is touched)."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]
    unchanged: tuple[str, ...]
    enabled: tuple[str, ...]  # only the enabled setting changed to true: start it
    disabled: tuple[str, ...]  # only the enabled setting changed to false: stop it

    def to_json(self) -> dict[str, list[str]]:
        return {k: list(getattr(self, k)) for k in
                ("added", "removed", "changed", "unchanged", "enabled", "disabled")}


def plan_reload(
    old: Mapping[str, tuple[InstanceConfig, bool]],
    new: Mapping[str, tuple[InstanceConfig, bool]],
) -> ReloadPlan:
    """Compare (config, effective enabled) per name. Only launch-relevant changes restart."""
    added = sorted(set(new) - set(old))
    removed = sorted(set(old) - set(new))
    changed: list[str] = []
    unchanged: list[str] = []
    enabled: list[str] = []
    disabled: list[str] = []
    for name in sorted(set(old) & set(new)):
        (old_cfg, old_on), (new_cfg, new_on) = old[name], new[name]
        if _launch_view(old_cfg) != _launch_view(new_cfg):
            changed.append(name)
        elif old_on != new_on:
            (enabled if new_on else disabled).append(name)
        else:
            unchanged.append(name)
    return ReloadPlan(*(tuple(x) for x in (added, removed, changed, unchanged, enabled, disabled)))


def _launch_view(cfg: InstanceConfig) -> InstanceConfig:
    # a new TTL or model name list changes no process: the scheduler reads them live
    return dataclasses.replace(cfg, enabled=True, ttl_s=0.0, models=None)


def autostarts(cfg: InstanceConfig) -> bool:
    """Whether the supervisor starts it by itself: on-demand instances start only when the
    on-demand scheduler asks (``start``), never at agent start, reload or resume."""
    return cfg.load == "always"


class Supervisor:
    """Owns every instance. Create it, ``await nursery.start(sup.run)``, then ``apply(...)``."""

    def __init__(self, *, ring_lines: int = 500, marker: ChildMarker | None = None) -> None:
        self.ring_lines = ring_lines
        self.marker = marker  # None: children are not marked, and no orphans are looked for
        self.line_sinks: list[LineSink] = []
        self.state_listeners: list[StateListener] = []
        self.launch_planner: LaunchPlanner | None = None
        self._instances: dict[str, Instance] = {}
        self._nursery: trio.Nursery | None = None
        self._held = False  # stop_all() holds instances down until start_enabled()
        self._unheld = trio.Event()  # set while not held
        self._unheld.set()
        self._changed = trio.Event()
        self._apply_lock = trio.Lock()  # a SIGHUP and an API reload at once apply one by one

    def __repr__(self) -> str:
        states = ", ".join(f"{i.name}={i.state.name}" for i in self._instances.values())
        return f"<Supervisor {len(self._instances)} instance(s): {states}{' held' if self._held else ''}>"

    # ---- watchers ----

    def add_line_sink(self, sink: LineSink) -> None:
        self.line_sinks.append(sink)

    def add_state_listener(self, listener: StateListener) -> None:
        self.state_listeners.append(listener)

    # ---- the service ----

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled; on the way out every instance is stopped and reaped.

        With a marker it first stops what an earlier run left behind, so ``started`` comes
        once their ports are free.
        """
        if self.marker is not None:
            await self._stop_orphans(self.marker)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    async def _stop_orphans(self, marker: ChildMarker) -> None:
        orphans = await trio.to_thread.run_sync(find_orphans, marker)
        async with trio.open_nursery() as nursery:
            for orphan in orphans:
                nursery.start_soon(stop_orphan, orphan)

    # ---- config ----

    async def apply(self, instances: Mapping[str, InstanceConfig],
                    enabled: Mapping[str, bool], reason: str = "reload") -> ReloadPlan:
        """Make the running set match ``instances``, touching only what differs.

        Removed and changed instances are stopped first (and awaited), so a port that moved
        from one instance to another is free before the new owner starts.
        """
        async with self._apply_lock:
            return await self._apply(instances, enabled, reason)

    async def _apply(self, instances: Mapping[str, InstanceConfig],
                     enabled: Mapping[str, bool], reason: str) -> ReloadPlan:
        nursery = self._require_nursery()
        old = {n: (i.config, i.enabled) for n, i in self._instances.items()}
        new = {n: (c, enabled.get(n, c.enabled)) for n, c in instances.items()}
        plan = plan_reload(old, new)
        stopping: list[Instance] = []
        for name in plan.removed:
            inst = self._instances.pop(name)
            inst.retire(f"{reason}: removed from config")
            stopping.append(inst)
        for name in plan.changed + plan.disabled:
            inst = self._instances[name]
            if inst.wanted or inst.is_running:
                inst.request_stop(f"{reason}: {'config changed' if name in plan.changed else 'disabled'}")
                stopping.append(inst)
        for inst in stopping:
            if inst.name in plan.removed:
                await inst.done.wait()
            else:
                await inst.wait_for(SETTLED)
        for name in plan.changed + plan.enabled + plan.disabled:
            inst = self._instances[name]
            inst.replace_config(instances[name])
            inst.enabled = new[name][1]
        for name in plan.added:
            cfg, on = new[name]
            inst = Instance(name, cfg, enabled=on, ring_lines=self.ring_lines, host=self)
            self._instances[name] = inst
            nursery.start_soon(inst.run, name=f"instance {name}")
        if not self._held:
            for name in plan.added + plan.changed + plan.enabled:
                inst = self._instances[name]
                if inst.enabled and autostarts(inst.config):
                    inst.request_start(f"{reason}: {_verb(name, plan)}")
        if plan.added or plan.removed or plan.changed or plan.enabled or plan.disabled:
            log.info("%s: added %s, removed %s, changed %s, enabled %s, disabled %s, unchanged %d",
                     reason, list(plan.added), list(plan.removed), list(plan.changed),
                     list(plan.enabled), list(plan.disabled), len(plan.unchanged))
        return plan

    # ---- requests by name (KeyError for an unknown name) ----

    def get(self, name: str) -> Instance:
        return self._instances[name]

    @property
    def names(self) -> list[str]:
        return list(self._instances)

    def start(self, name: str, reason: str) -> None:
        self._instances[name].request_start(reason)

    def stop(self, name: str, reason: str) -> None:
        self._instances[name].request_stop(reason)

    def restart(self, name: str, reason: str) -> None:
        self._instances[name].request_restart(reason)

    def set_enabled(self, name: str, enabled: bool, reason: str) -> None:
        """Record the effective enabled setting and start or stop to match."""
        inst = self._instances[name]
        inst.enabled = enabled
        if enabled and not self._held and autostarts(inst.config):
            inst.request_start(reason)
        elif not enabled:
            inst.request_stop(reason)

    # ---- what the power manager uses ----

    async def stop_all(self, reason: str) -> None:
        """Stop every instance gracefully and hold them down until ``start_enabled``."""
        self._held = True
        if self._unheld.is_set():
            self._unheld = trio.Event()
        for inst in self._instances.values():
            inst.request_stop(reason)
        for inst in list(self._instances.values()):
            await inst.wait_for(SETTLED)

    async def start_enabled(self, reason: str) -> None:
        """Start every enabled ``load = "always"`` instance (FAILED ones get a fresh try); lifts
        ``stop_all``'s hold.

        Returns at once; READY shows as a state change (or use ``wait_all_ready``).
        """
        self.lift_hold()
        for inst in self._instances.values():
            if inst.enabled and autostarts(inst.config):
                inst.request_start(reason)

    def lift_hold(self) -> None:
        """End ``stop_all``'s hold without starting anything: on a resume, what requests are
        held for starts first, through the on-demand scheduler, before ``start_enabled``."""
        self._held = False
        self._unheld.set()

    async def wait_unheld(self) -> None:
        """Return once the hold of ``stop_all`` is lifted (at once when there is none)."""
        await self._unheld.wait()

    @property
    def held(self) -> bool:
        """True between ``stop_all`` and ``start_enabled`` (the box is going to sleep)."""
        return self._held

    def enabled_names(self) -> list[str]:
        """Enabled instances that start by themselves (what a resume waits READY for)."""
        return [i.name for i in self._instances.values() if i.enabled and autostarts(i.config)]

    async def wait_all_ready(self, timeout_s: float) -> bool:
        """True once every instance that should run is READY; False after ``timeout_s``.

        An instance that ends FAILED no longer counts as "should run", so this returns
        as soon as the others are READY; read ``snapshot()`` for who failed.
        """
        with trio.move_on_after(timeout_s):
            while any(i.wanted and i.state is not State.READY for i in self._instances.values()):
                await self._changed.wait()
            return True
        return False

    def snapshot(self) -> list[InstanceStatus]:
        now = trio.current_time()
        rows = []
        for inst in self._instances.values():
            cfg = inst.config
            rows.append(InstanceStatus(
                name=inst.name, state=inst.state, reason=inst.reason, enabled=inst.enabled,
                pid=inst.child.pid if inst.child else None, host=cfg.host,
                port=cfg.effective_port,
                gpus=_running_gpus(inst),
                uptime_s=(now - inst.started_at) if inst.started_at is not None else None,
                in_state_s=now - inst.state_since, restarts=inst.restarts,
                last_error=inst.last_error,
            ))
        return rows

    def logs(self, name: str, lines: int) -> list[LogLine]:
        return self._instances[name].ring.tail(lines)

    # ---- InstanceHost ----

    def state_changed(self, name: str, old: State, new: State, reason: str) -> None:
        log.info("instance %s: %s -> %s (%s)", name, old.name, new.name, reason)
        changed, self._changed = self._changed, trio.Event()
        changed.set()
        for listener in self.state_listeners:
            try:
                listener(name, old, new, reason)
            except Exception:
                log.exception("state listener %r failed on %s %s -> %s", listener, name,
                              old.name, new.name)

    async def plan_launch(self, name: str, config: InstanceConfig) -> LaunchOverrides | None:
        if self.launch_planner is None:
            return None
        return await self.launch_planner(name, config)

    def child_env(self, name: str) -> dict[str, str]:
        return {} if self.marker is None else self.marker.env(name)

    def port_user(self, port: int, asking: str) -> str | None:
        for inst in self._instances.values():
            if inst.name != asking and inst.is_running and inst.config.effective_port == port:
                return f"instance {inst.name!r} ({inst.state.value})"
        return None

    def _require_nursery(self) -> trio.Nursery:
        if self._nursery is None:
            raise RuntimeError("Supervisor.run is not running; start it with nursery.start(sup.run)")
        return self._nursery


def _verb(name: str, plan: ReloadPlan) -> str:
    if name in plan.added:
        return "added"
    return "config changed" if name in plan.changed else "enabled"


def _running_gpus(inst: Instance) -> list[int | str] | str | None:
    """The GPUs the running child got (placement may have chosen them), else the config's."""
    launch = inst.launch
    if inst.child is not None and launch is not None and launch.gpus is not None:
        return list(launch.gpus)
    return inst.config.gpus


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
