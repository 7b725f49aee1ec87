"""The on-demand scheduler: the one owner of loading and unloading ``load = "on-demand"``
instances.

``await service.load(model)`` resolves a model name (``models`` of an instance, default its
name) and returns once that instance is READY, or raises ``LoadRefused`` / ``LoadFailed``
with the one-line reason. Each call takes the decision lock, feeds ``policy.decide_load``
with the instances (phase from the supervisor, busy and last task end from activity, MiB
per device from ``estimate_instance``) and the memory (NVML free per GPU minus the safety
margin, ``agent.memory_budget_mib``), and acts: it stops the instances to evict (and waits
until they have exited), then asks the supervisor to start this one. One decision runs at a
time, so two loads never count the same free memory; callers that ask for a model already
loading join that load and all get its outcome. A load that does not reach READY (the
child exits, or its health check gives up) is stopped at once and every waiting caller gets
the instance's error; nothing else is evicted for it.

``run`` unloads instances whose TTL ran out (``policy.ttl_expired``) and hosts the task
that watches each load. Every start and stop goes through the supervisor with its reason,
so the log reads ``instance coder: READY -> STOPPING (evicted for qwen: needs ...)``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final

import trio
from prometheus_client import Counter, Histogram
from prometheus_client.registry import Collector

from inference_node.errors import LoadFailed, LoadRefused, UnknownModel
from inference_node.gpu.inventory import GpuInfo
from inference_node.ondemand.attempt import (
    JOIN_OUTCOMES,
    LOAD_OUTCOMES,
    PHASES,
    Attempt,
    LoadOutcome,
)
from inference_node.ondemand.estimate import InstanceEstimator
from inference_node.ondemand.policy import (
    InstanceView,
    JoinLoad,
    Load,
    LoadMode,
    Memory,
    Phase,
    Ready,
    Refuse,
    Wait,
    decide_load,
    next_ttl_deadline,
    ttl_expired,
    ttl_left,
)
from inference_node.ondemand.routes import add_routes
from inference_node.placement.autoplace import gpus_from_inventory
from inference_node.supervisor.state import State
from inference_node.supervisor.supervisor import SETTLED, Supervisor
from shared.config.node import InstanceConfig, NodeAgentConfig
from shared.http import App

log = logging.getLogger(__name__)

# With nothing counting down, the TTL loop still looks again this often (a missed edge).
IDLE_RECHECK_S: Final = 60.0
# An evicted instance gets its own stop_timeout_s and this much more to exit.
EVICT_MARGIN_S: Final = 5.0
# A load asked for while the node goes to sleep (or has just resumed and not yet lifted the
# supervisor's hold) waits this long for the hold to lift; trio's clock stops in the sleep.
HELD_LOAD_WAIT_S: Final = 120.0
LOAD_SECONDS_BUCKETS: Final = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)


class OnDemandService:
    """Component: models on demand (see module doc)."""

    def __init__(self, supervisor: Supervisor, config: NodeAgentConfig, *,
                 busy: Callable[[str], bool],
                 gpus: Callable[[], Sequence[GpuInfo]] = list,
                 estimator: InstanceEstimator | None = None) -> None:
        self._sup = supervisor
        self._config = config
        self._busy = busy
        self._gpus = gpus
        self._estimator = estimator or InstanceEstimator()
        self._lock = trio.Lock()  # one decision at a time
        self._changed = trio.Event()
        self._attempts: dict[str, Attempt] = {}
        self._last_use: dict[str, float] = {}
        self._needs: dict[str, Mapping[str, float]] = {}  # estimates of the running ones
        self._nursery: trio.Nursery | None = None
        # Told the instances about to stop, before they are (the proxy then holds their
        # models' requests for a load instead of sending them to an exiting llama-server).
        self.announce: Callable[[Sequence[str], str], Awaitable[None]] | None = None
        self.loads = Counter("llamanap_ondemand_loads", "On-demand loads by model and result "
                             "(ok, failed, refused)", ["model", "result"], registry=None)
        self.unloads = Counter("llamanap_ondemand_unloads", "On-demand unloads by model and "
                               "reason (evicted, ttl, api)", ["model", "reason"],
                               registry=None)
        self.load_seconds = Histogram("llamanap_ondemand_load_seconds", "Time from the load "
                                      "decision to READY", ["model"], registry=None,
                                      buckets=LOAD_SECONDS_BUCKETS)

    def __repr__(self) -> str:
        return (f"<OnDemandService loading={sorted(self._attempts)} "
                f"budget={self._config.agent.memory_budget_mib} MiB>")

    # ---- what others call ----

    def on_state(self, name: str, old: State, new: State, reason: str) -> None:
        """Supervisor listener: a fresh READY counts as a use (the TTL runs from there)."""
        if new is State.READY:
            self._last_use[name] = trio.current_time()
        elif new is State.STARTING:
            self._needs.pop(name, None)  # a new run: its config may have changed
        self._notify()

    def estimates(self) -> dict[str, Mapping[str, float]]:
        """The estimate (MiB per device key) of every instance running now, as far as made
        (``run`` makes each one soon after its start)."""
        return {n: need for n, need in self._needs.items() if n in self._sup.names
                and PHASES[self._sup.get(n).state] is not Phase.UNLOADED}

    def on_busy(self, name: str, busy: bool, t: float) -> None:
        """Activity listener: the TTL runs from the end of the last task."""
        if not busy:
            self._last_use[name] = t
        self._notify()

    def on_reload(self, config: NodeAgentConfig) -> None:
        """New TTLs, model names and load modes apply to the next decision."""
        self._config = config
        self._notify()

    def routes(self, app: App) -> None:
        add_routes(app, self)

    def collectors(self) -> list[Collector]:
        return [self.loads, self.unloads, self.load_seconds]

    def resolve(self, model: str) -> str:
        """The instance serving ``model``; UnknownModel lists the names that exist."""
        for name, cfg in self._config.instances.items():
            if model in cfg.model_names(name):
                return name
        known = ", ".join(self.model_names()) or "none"
        raise UnknownModel(f"no instance serves model {model!r}; known models: {known}")

    def model_names(self) -> list[str]:
        return [m for n, c in self._config.instances.items() for m in c.model_names(n)]

    def instances_for(self, models: Sequence[str], ports: Sequence[int]) -> list[str]:
        """The instances serving ``models`` or listening on ``ports`` (names and ports this
        node does not have are left out), in the order asked, each once."""
        names: list[str] = []
        for model in models:
            with contextlib.suppress(UnknownModel):
                names.append(self.resolve(model))
        for port in ports:
            names += [n for n, c in self._config.instances.items() if c.effective_port == port]
        return [n for n in dict.fromkeys(names) if n in self._sup.names]

    async def load(self, model: str) -> LoadOutcome:
        """Return once the model's instance is READY (see module doc)."""
        return await self.load_instance(self.resolve(model))

    async def load_instance(self, name: str, *, until_ready: bool = True) -> LoadOutcome:
        """The scheduler's decision for instance ``name``, carried out; returns once it is
        READY, or with ``until_ready=False`` once its start is requested (``load_s`` None).
        While the node is going to sleep or just resumed (the supervisor holds instances
        down) it waits up to ``HELD_LOAD_WAIT_S`` for the hold to lift."""
        waiting_since: float | None = None
        while True:
            if self._sup.held:
                with trio.move_on_after(HELD_LOAD_WAIT_S):
                    await self._sup.wait_unheld()
            async with self._lock:
                attempt, outcome, wait_for = await self._decide(name, waiting_since)
            if outcome is not None:
                return outcome
            if attempt is not None:
                break
            waiting_since = waiting_since if waiting_since is not None else trio.current_time()
            # a busy instance ends its task, or a stopping one exits: decide again
            with trio.move_on_after(self._config.agent.evict_wait_s):
                await wait_for.wait()
        if not until_ready:
            return LoadOutcome(name, attempt.reason, attempt.evicted, None)
        await attempt.done.wait()
        if attempt.error is not None:
            raise LoadFailed(attempt.error)
        return LoadOutcome(name, attempt.reason, attempt.evicted,
                           trio.current_time() - attempt.started)

    async def unload(self, model: str, reason: str = "unload requested through the API") -> str:
        """Stop the model's on-demand instance and return once it has exited."""
        name = self.resolve(model)
        cfg = self._config.instances[name]
        if cfg.load != "on-demand":
            raise LoadRefused(f"instance {name} has load = \"always\"; stop it with "
                              f"`node-agent stop {name}` or set instances.{name}.load = "
                              "\"on-demand\"")
        async with self._lock:
            if name not in self._sup.names:
                return name  # not applied yet: nothing runs
            inst = self._sup.get(name)
            if inst.wanted or inst.is_running:
                await self._stop((name,), reason, "api")
                await inst.wait_for(SETTLED)
        return name

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Unload on TTL until cancelled; load watchers live in this nursery."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                while True:
                    changed = self._changed
                    await self._estimate_running()
                    async with self._lock:
                        now = trio.current_time()
                        views = self._views({})
                        for unload in ttl_expired(views, now):
                            await self._stop((unload.name,), unload.reason, "ttl")
                        delay = next_ttl_deadline(self._views({}), now)
                    with trio.move_on_after(IDLE_RECHECK_S if delay is None else delay):
                        await changed.wait()
            finally:
                self._nursery = None

    async def status(self) -> list[dict[str, Any]]:
        """One row per model name: state, instance, GPUs, estimated MiB, last use, TTL left."""
        gpus = await trio.to_thread.run_sync(self._gpus)
        now = trio.current_time()
        rows = []
        snapshot = {r.name: r for r in self._sup.snapshot()}
        for name, cfg in self._config.instances.items():
            if name not in snapshot:
                continue  # a config the supervisor has not applied yet
            need, problem = await self._estimator.need(name, cfg, gpus)
            v = self._view(name, need or {}, cfg)
            last = self._last_use.get(name)
            state = "loaded" if v.phase is Phase.READY else v.phase.value
            row = snapshot[name]
            for model in cfg.model_names(name):
                rows.append({
                    "model": model, "instance": name, "load": cfg.load, "state": state,
                    "enabled": row.enabled, "busy": v.busy,
                    "gpus": row.gpus,
                    "estimated_mib": None if need is None else
                    {d: round(m, 1) for d, m in need.items()},
                    "estimate_error": problem,
                    "last_use_s_ago": None if last is None else round(now - last, 1),
                    "ttl_s": cfg.ttl_s if cfg.load == "on-demand" else None,
                    "ttl_left_s": None if (t := ttl_left(v, now)) is None else round(t, 1),
                })
        return rows

    # ---- the decision ----

    async def _decide(self, name: str, waiting_since: float | None
                      ) -> tuple[Attempt | None, LoadOutcome | None, trio.Event]:
        """Under the lock: one policy decision and its effects. Returns the attempt to wait
        on, or an outcome (already loaded), or neither (wait for this event, then retry)."""
        changed = self._changed
        if name not in self._sup.names:
            raise LoadRefused(f"instance {name} is not running under the supervisor yet "
                              "(the agent is starting or reloading); try again")
        inst = self._sup.get(name)
        if name in self._attempts:
            return self._attempts[name], None, changed
        if not inst.enabled:
            self.loads.labels(self._label(name), "refused").inc()
            raise LoadRefused(f"instance {name} is disabled; `node-agent enable {name}` first")
        if self._sup.held:
            self.loads.labels(self._label(name), "refused").inc()
            raise LoadRefused(f"node is suspending; model {self._label(name)} loads after "
                              "the resume")
        gpus = await trio.to_thread.run_sync(self._gpus)
        needs: dict[str, Mapping[str, float]] = {}
        for other, other_cfg in self._config.instances.items():
            need, problem = await self._estimator.need(other, other_cfg, gpus)
            if other == name and need is None:
                self.loads.labels(self._label(name), "refused").inc()
                raise LoadRefused(f"model {self._label(name)}: {problem}")
            needs[other] = need or {}
        margin = self._config.placement.safety_margin_mib
        free = gpus_from_inventory(gpus)
        memory = Memory(free_mib={g.uuid: g.free_mib - margin for g in free},
                        total_mib={g.uuid: g.total_mib for g in free},
                        budget_mib=self._config.agent.memory_budget_mib)
        now = trio.current_time()
        decision = decide_load(name, self._views(needs), memory, now, waiting_since,
                               self._config.agent.evict_wait_s)
        if isinstance(decision, Ready):
            self._last_use[name] = now  # a load call is a use: the TTL starts again
            return None, LoadOutcome(name, decision.reason, (), None), changed
        if isinstance(decision, JoinLoad):
            # started by the supervisor (an always instance, a respawn after a crash): wait
            # for it through its own restarts
            attempt = self._watch(name, "started by the supervisor", (), None, JOIN_OUTCOMES)
            return attempt, None, changed
        if isinstance(decision, Wait):
            log.info("model %s: %s", self._label(name), decision.reason)
            return None, None, changed
        if isinstance(decision, Refuse):
            self.loads.labels(self._label(name), "refused").inc()
            log.warning("model %s: refused: %s", self._label(name), decision.reason)
            raise LoadRefused(decision.reason)
        assert isinstance(decision, Load)
        # (read before the awaits: a reload meanwhile may remove a victim from the config)
        stop_timeouts = {v: self._config.instances[v].stop_timeout_s for v in decision.evict}
        await self._stop(decision.evict, decision.evict_reason, "evicted")
        for victim in decision.evict:
            with trio.move_on_after(stop_timeouts[victim] + EVICT_MARGIN_S):
                await self._sup.get(victim).wait_for(SETTLED)
        mark = inst.transitions
        self._sup.start(name, f"load for model {self._label(name)}: {decision.reason}")
        return self._watch(name, decision.reason, decision.evict, mark), None, changed

    def _watch(self, name: str, reason: str, evicted: tuple[str, ...],
               mark: int | None = None, outcomes: frozenset[State] = LOAD_OUTCOMES
               ) -> Attempt:
        attempt = Attempt(name, reason, trio.current_time(), evicted)
        if self._nursery is None:
            raise RuntimeError("OnDemandService.run is not running; start it in a nursery")
        self._attempts[name] = attempt
        self._nursery.start_soon(self._follow, attempt, mark, outcomes)
        return attempt

    async def _follow(self, attempt: Attempt, mark: int | None,
                      outcomes: frozenset[State]) -> None:
        """Owner of one load: wait for its outcome, stop a failed one, tell every caller."""
        name, label = attempt.name, self._label(attempt.name)
        inst = self._sup.get(name)
        try:
            if mark is not None:
                await inst.wait_transition(mark)  # the owner task took the start request
            await inst.wait_for(outcomes)
            if inst.state is State.READY:
                self.loads.labels(label, "ok").inc()
                self.load_seconds.labels(label).observe(trio.current_time() - attempt.started)
                return
            why = inst.last_error or inst.reason
            attempt.error = f"model {label} (instance {name}) failed to load: {why}"
            self.loads.labels(label, "failed").inc()
            log.warning("%s", attempt.error)
            cfg = self._config.instances.get(name)  # None: a reload removed it meanwhile
            on_demand = cfg is not None and cfg.load == "on-demand"
            if inst.wanted and on_demand:
                self._sup.stop(name, "load failed; not retried until the next request")
        finally:
            del self._attempts[name]
            attempt.done.set()
            self._notify()

    # ---- helpers ----

    async def _estimate_running(self) -> None:
        """Estimate the instances that run and have no estimate yet (for the GPU status)."""
        todo = [n for n in self._sup.names if n in self._config.instances
                and n not in self._needs and PHASES[self._sup.get(n).state] is not Phase.UNLOADED]
        if not todo:
            return
        gpus = await trio.to_thread.run_sync(self._gpus)
        for name in todo:
            cfg = self._config.instances.get(name)
            if cfg is None:  # a reload removed it while this awaited
                continue
            need, _ = await self._estimator.need(name, cfg, gpus)
            if need is not None:
                self._needs[name] = need

    async def _stop(self, names: Sequence[str], reason: str, kind: str) -> None:
        """Stop these instances, the proxy told first (``announce``). A TTL stop is called
        off for an instance that got a task meanwhile."""
        if not names:
            return
        if self.announce is not None:
            await self.announce(names, reason)
        for name in names:
            if kind == "ttl" and self._busy(name):
                log.info("model %s: not unloaded: a task began as its ttl ran out",
                         self._label(name))
                continue
            self.unloads.labels(self._label(name), kind).inc()
            self._sup.stop(name, reason)

    def _views(self, needs: Mapping[str, Mapping[str, float]]) -> list[InstanceView]:
        instances = self._config.instances
        return [self._view(n, needs.get(n, {}), instances[n]) for n in self._sup.names
                if n in instances]

    def _view(self, name: str, need: Mapping[str, float], cfg: InstanceConfig) -> InstanceView:
        inst = self._sup.get(name)
        phase = Phase.LOADING if name in self._attempts else PHASES[inst.state]
        if phase is Phase.UNLOADED and inst.wanted and inst.state is State.STOPPED:
            phase = Phase.LOADING  # asked to start, its owner task has not moved yet
        mode = LoadMode.ON_DEMAND if cfg.load == "on-demand" else LoadMode.ALWAYS
        busy = phase is not Phase.UNLOADED and self._busy(name)
        return InstanceView(name, mode, phase, need, busy, self._last_use.get(name), cfg.ttl_s)

    def _label(self, name: str) -> str:
        cfg = self._config.instances.get(name)
        return cfg.model_names(name)[0] if cfg is not None else name

    def _notify(self) -> None:
        changed, self._changed = self._changed, trio.Event()
        changed.set()
