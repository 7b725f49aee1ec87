"""The suspend/resume sequence: trio code that feeds the pure policy and carries out its verdicts.

    idle for idle_timeout_s → ask the proxy (``suspending``; a veto resets the timer)
      → stop instances → release P-states → ``suspended`` → run the suspend command
      → wait to *see* the resume (sleep hook ``post``, logind, clock gap)
      → start what the proxy holds requests for (``held_first``), once READY the enabled
        instances → ``resumed`` → ``ready`` as each becomes READY

A suspend that fails (the command fails, or no resume is seen) restarts the instances, tells the
proxy, is reported in status, and backs off before the next try.

At start the agent announces itself: its models at once, then ``ready`` as instances become
READY, so a proxy that took the node for asleep (it started first, or the node came up by
hand) relays to it instead of waking it. Every event carries the node's models; when
they change (a reload, an instance enabled or disabled) a ``models`` event says so.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from inference_node.errors import ProxyUnreachable, SuspendFailed
from inference_node.power.checks import Check, gather_reasons
from inference_node.power.held_first import HeldFirst
from inference_node.power.policy import IdlePolicy, PowerEvent, PowerMachine, PowerState, Verdict
from inference_node.power.proxy_client import ProxyClient
from inference_node.power.resume import ResumeSignal, watch_clock_gap, watch_logind
from inference_node.power.suspend import SuspendAction
from shared.config.node import PowerSection
from shared.errors import LlamanapError
from shared.events import EventKind

log = logging.getLogger(__name__)

# How long instances may take to become READY after a resume before the proxy is told `ready`
# anyway (the proxy then falls back to its own readiness probes, so nothing is lost).
READY_WAIT_S = 600.0
# A models event the proxy did not take is tried again after this long, not every round.
MODELS_RETRY_S = 60.0
HISTORY_LEN = 20  # suspend/resume records kept for `status`


class InstanceControl(Protocol):
    """What the power manager needs from the supervisor."""

    async def stop_all(self, reason: str) -> None:
        """Stop every instance gracefully; return once all are stopped."""
        ...

    async def start_enabled(self, reason: str) -> None:
        """Start every enabled instance (return at once; READY is reported as a state change)."""
        ...

    def enabled_names(self) -> list[str]: ...


class PstateRelease(Protocol):
    async def release_all(self, reason: str) -> None:
        """Give every GPU back to the driver (P-state 16) before the machine sleeps."""
        ...

    def resume_control(self) -> None:
        """Switch P-states again (the machine is back, or the suspend did not happen)."""
        ...


@dataclass
class CycleRecord:
    """One suspend attempt, for `node-agent status` and the wake timeline."""

    started: float
    outcome: str = "running"
    steps: list[tuple[str, float]] = field(default_factory=list)

    def mark(self, step: str, now: float) -> None:
        self.steps.append((step, now))
        log.info("power: %s", step)


class PowerManager:
    """Owns the node's power state machine. Run ``run()`` in the agent's nursery."""

    def __init__(
        self,
        cfg: PowerSection,
        checks: Sequence[Check],
        instances: InstanceControl,
        suspend: SuspendAction,
        *,
        proxy: ProxyClient | None = None,
        pstates: PstateRelease | None = None,
        resume_timeout_s: float = 120.0,
        watch_system: bool = True,
        clock: Callable[[], float] = trio.current_time,
        starting: Callable[[], Iterable[str]] | None = None,
        first: HeldFirst | None = None,
    ) -> None:
        """``starting``: the instances the agent starts with, before the supervisor has them
        (default ``instances.enabled_names``); ``first``: what starts before them on a
        resume (None: they start at once)."""
        self.first = first
        self.cfg = cfg
        self.starting = starting or instances.enabled_names
        self.checks = list(checks)
        self.instances = instances
        self.suspender = suspend
        self.proxy = proxy
        self.pstates = pstates
        self.resume_timeout_s = resume_timeout_s  # counts awake time only: trio's clock stops in sleep
        self.watch_system = watch_system
        self.clock = clock
        self.resume = ResumeSignal()
        now = clock()
        self.policy = IdlePolicy(cfg.idle_timeout_s, cfg.min_awake_s, now)
        self.machine = PowerMachine(now)
        self.verdict = Verdict(False, ("starting",), None)
        self.history: list[CycleRecord] = []
        self.last_error = ""
        self._ready_send, self._ready_recv = trio.open_memory_channel[str](math.inf)
        self._ready_now: set[str] = set()  # instances READY now (for the start announcement)
        self._ready_changed = trio.Event()
        self._models_retry_at = -math.inf
        self._poke = trio.Event()

    # -- inputs from other parts of the agent -------------------------------------------------

    def on_instance_state(self, instance: str, old: Any, new: Any, reason: str) -> None:
        """Supervisor state listener: READY instances are announced to the proxy while resuming."""
        if getattr(new, "name", str(new)) == "READY":
            self._ready_send.send_nowait(instance)
            self._ready_now.add(instance)
        else:
            self._ready_now.discard(instance)
        changed, self._ready_changed = self._ready_changed, trio.Event()
        changed.set()

    def reconfigure(self, cfg: PowerSection, checks: Sequence[Check],
                    suspend: SuspendAction | None = None) -> None:
        """New ``[power]`` settings and the checks built from them (a config reload), used
        from the next round on; ``suspend`` replaces the suspend action when given."""
        self.cfg = cfg
        self.policy.reconfigure(cfg.idle_timeout_s, cfg.min_awake_s)
        self.resume_timeout_s = cfg.resume_timeout_s
        self.checks = list(checks)
        if suspend is not None:
            self.suspender = suspend

    def poke(self) -> None:
        """Run a round now (an inhibit ended), not at the next interval."""
        self._poke.set()

    async def refresh_verdict(self) -> None:
        """Run the checks and update what status shows now; acting on it is the loop's job."""
        reasons = await gather_reasons(self.checks)
        self.verdict = self.policy.observe(self.clock(), reasons)

    def hook(self, phase: str) -> str:
        """The system-sleep hook's call: ``pre`` before the kernel sleeps, ``post`` after."""
        if phase == "post":
            self.resume.fire("sleep hook: post")
            self._poke.set()
            return "resume noted"
        if phase == "pre":
            log.info("power: sleep hook pre (state %s)", self.machine.state.name)
            return "noted"
        raise LlamanapError(f"hook phase {phase!r} is not pre or post")

    def status(self) -> dict[str, Any]:
        now = self.clock()
        return {
            "state": self.machine.state.name,
            "in_state_s": round(now - self.machine.since, 1),
            "reason": self.machine.last_reason,
            "verdict": self.verdict.describe(now),
            "keeping_awake": list(self.verdict.reasons),
            "sleep_in_s": None if self.verdict.sleep_at is None else round(max(0.0, self.verdict.sleep_at - now), 1),
            "enabled": self.cfg.enabled,
            "last_error": self.last_error,
            "history": [
                {"outcome": r.outcome, "steps": [(s, round(t - r.started, 3)) for s, t in r.steps]}
                for r in self.history[-5:]
            ],
        }

    # -- the loop ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            if self.watch_system:
                nursery.start_soon(watch_clock_gap, self.resume)
                nursery.start_soon(watch_logind, self.resume)
            nursery.start_soon(self._announce_start)
            task_status.started()
            while True:
                await self.step()
                with trio.move_on_after(self.cfg.check_interval_s):
                    await self._poke.wait()
                self._poke = trio.Event()

    async def step(self) -> None:
        """One round: notice resumes and backoffs, run the checks, suspend if the policy says so."""
        state = self.machine.state
        if self.resume.is_set() and state in (PowerState.AWAKE, PowerState.FAILED):
            # A sleep the agent did not start (someone ran `systemctl suspend`): CUDA contexts
            # may not have survived, so restart the instances cleanly.
            record = self._new_record()
            await self.instances.stop_all("resumed from a sleep the agent did not start")
            await self._resume(record)
            return
        now = self.clock()
        if state is PowerState.FAILED and now >= self.policy.not_before:
            self.machine.apply(PowerEvent.RETRY, now, "backoff over")
        await self._models_changed()
        reasons = await gather_reasons(self.checks)
        self.verdict = self.policy.observe(self.clock(), reasons)
        if self.verdict.suspend and self.cfg.enabled and self.machine.can(PowerEvent.IDLE):
            await self._suspend_cycle()

    async def _suspend_cycle(self) -> None:
        record = self._new_record()
        idle_for = self.clock() - (self.policy.idle_since or self.clock())
        self.machine.apply(PowerEvent.IDLE, self.clock(), f"idle for {idle_for:.0f} s")
        if not await self._proxy_agrees(record):
            return
        # Last look: a task may have started between the checks and the proxy's answer.
        reasons = await gather_reasons(self.checks)
        if reasons:
            await self._abort(record, "activity began: " + "; ".join(reasons))
            return
        self.resume.reset()
        record.mark("stopping instances", self.clock())
        await self.instances.stop_all("suspending: node idle")
        if self.pstates is not None:
            record.mark("releasing P-states", self.clock())
            await self.pstates.release_all("suspending")
        record.mark("suspend command", self.clock())
        # Told first: once the command runs, the agent may get no further word out, and the
        # proxy would otherwise wait for its probes to time out (or drain_timeout_s).
        await self._tell_proxy("suspended", "running the suspend command")
        try:
            await self.suspender.suspend()
        except SuspendFailed as exc:
            await self._failed(record, str(exc))
            return
        self.machine.apply(PowerEvent.SUSPEND_ISSUED, self.clock(), "suspend command returned 0")
        with trio.move_on_after(self.resume_timeout_s):
            how = await self.resume.wait()
            record.mark(f"resume seen ({how})", self.clock())
            await self._resume(record)
            return
        await self._failed(record, f"no resume seen within {self.resume_timeout_s:.0f} s of the "
                                   "suspend command: the machine did not sleep (inhibitor lock? "
                                   "check `journalctl -u systemd-suspend`)")

    async def _proxy_agrees(self, record: CycleRecord) -> bool:
        if self.proxy is None:
            return True
        record.mark("asking the proxy", self.clock())
        try:
            reply = await self.proxy.send("suspending", self.verdict.describe(self.clock()))
        except ProxyUnreachable as exc:
            if self.proxy.cfg.allow_suspend_if_unreachable:
                log.warning("power: %s; suspending anyway (proxy.allow_suspend_if_unreachable)", exc)
                return True
            await self._abort(record, f"{exc}; not suspending (proxy.allow_suspend_if_unreachable = false)",
                              tell_proxy=False)
            return False
        if not reply.allowed:
            await self._abort(record, f"proxy vetoed: {reply.reason} (in flight: {reply.in_flight})",
                              tell_proxy=False)
            return False
        return True

    async def _abort(self, record: CycleRecord, why: str, *, tell_proxy: bool = True) -> None:
        record.outcome = f"vetoed: {why}"
        self.machine.apply(PowerEvent.VETO, self.clock(), why)
        self.policy.vetoed(self.clock())
        if tell_proxy:  # the proxy agreed and holds new connections: let them through again
            await self._tell_proxy("ready", "suspend aborted")

    async def _failed(self, record: CycleRecord, why: str) -> None:
        record.outcome = f"failed: {why}"
        self.last_error = why
        log.error("power: suspend failed: %s; restarting instances, next try in %.0f s",
                  why, self.cfg.failed_suspend_backoff_s)
        self.machine.apply(PowerEvent.SUSPEND_FAILED, self.clock(), why)
        self.policy.failed(self.clock(), self.cfg.failed_suspend_backoff_s)
        if self.pstates is not None:
            self.pstates.resume_control()
        await self._start_instances(record, "suspend failed")
        await self._tell_proxy("resumed", "suspend failed; node stayed up")
        await self._announce_ready(record)

    async def _resume(self, record: CycleRecord) -> None:
        how = self.resume.last_reason or "resume"
        self.resume.reset()
        self.machine.apply(PowerEvent.RESUME, self.clock(), how)
        self.policy.resumed(self.clock())
        if self.pstates is not None:
            self.pstates.resume_control()
        await self._start_instances(record, f"resumed ({how})")
        await self._tell_proxy("resumed", how)
        record.mark("resumed sent", self.clock())
        await self._announce_ready(record)
        record.outcome = "slept and resumed"
        self.machine.apply(PowerEvent.READY, self.clock(), "instances started")

    async def _start_instances(self, record: CycleRecord, reason: str) -> None:
        if self.first is not None:
            first = await self.first.start(reason)
            if first:
                record.mark(f"started first: {', '.join(first)}", self.clock())
        record.mark("starting instances", self.clock())
        await self.instances.start_enabled(reason)

    async def _announce_ready(self, record: CycleRecord) -> None:
        """Send ``ready`` as each enabled instance becomes READY (bounded by ``READY_WAIT_S``)."""
        waiting = set(self.instances.enabled_names())
        total = len(waiting)
        with trio.move_on_after(READY_WAIT_S):
            while waiting:
                name = await self._ready_recv.receive()
                if name not in waiting:
                    continue
                waiting.discard(name)
                record.mark(f"{name} READY", self.clock())
                await self._tell_proxy("ready", f"{name} READY ({total - len(waiting)}/{total})")
        if waiting:
            log.warning("power: %s not READY after %.0f s", ", ".join(sorted(waiting)), READY_WAIT_S)
        if total == 0:
            await self._tell_proxy("ready", "no instances enabled")

    async def _announce_start(self) -> None:
        """At start, ``ready`` as each enabled instance becomes READY (the first round sends
        the models). Not ``resumed``: that starts a wake at the proxy, whose magic packets
        would go out for as long as the models load, to a host that is up."""
        announced: set[str] = set()
        with trio.move_on_after(READY_WAIT_S):
            while True:
                waiting = set(self.instances.enabled_names()) or set(self.starting())
                for name in sorted((self._ready_now & waiting) - announced):
                    announced.add(name)
                    await self._tell_proxy("ready", f"node-agent started: {name} READY "
                                           f"({len(announced)}/{len(waiting)})")
                if not waiting:
                    await self._tell_proxy("ready", "node-agent started; no instances enabled")
                if waiting <= announced:
                    return
                await self._ready_changed.wait()

    async def _models_changed(self) -> None:
        """Send ``models`` when the node's list differs from the one the proxy last took."""
        proxy = self.proxy
        if proxy is None or proxy.models is None or self.clock() < self._models_retry_at:
            return
        if tuple(proxy.models()) == proxy.sent_models:
            return
        try:
            await proxy.send("models", "the model list changed")
        except ProxyUnreachable as exc:
            self._models_retry_at = self.clock() + MODELS_RETRY_S
            log.warning("power: could not send the model list to the proxy: %s (next try in "
                        "%.0f s)", exc, MODELS_RETRY_S)

    async def _tell_proxy(self, event: EventKind, reason: str) -> None:
        if self.proxy is None:
            return
        try:
            await self.proxy.send(event, reason)
        except ProxyUnreachable as exc:
            log.warning("power: could not send %s to the proxy: %s (it will find out by probing)", event, exc)

    def _new_record(self) -> CycleRecord:
        while True:  # drop READY notices from before this cycle
            try:
                self._ready_recv.receive_nowait()
            except trio.WouldBlock:
                break
        record = CycleRecord(self.clock())
        self.history = [*self.history[-(HISTORY_LEN - 1):], record]
        return record
