"""The P-state controller: one trio task that applies the policy to every GPU.

That task is the only caller of the P-state backend: other tasks send it requests
(``await release_all(reason)`` before a suspend returns once the loop has released every
GPU; ``resume_control()``), so two threads never switch a GPU at once.

It wakes on every busy/idle edge from activity (``on_busy`` is an activity listener), so a GPU goes high as soon as a ``processing task`` line is read, not at a poll
tick; it also wakes when a low delay or a read-back check falls due. Each forced state is read
back through NVML: a switch the backend called successful but NVML does not show makes the GPU
NOT_WORKING, with the reason in its status. A GPU other programs compute on (``held_by_others``,
checked at each inventory refresh) counts as busy. Each GPU's control health moves by the table
in ``control_state``. When ``run`` ends, for any reason, every GPU
it forced is released to 16 ("driver decides").
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Collection, Iterable
from typing import Any, Final, Protocol

import trio

from inference_node.activity.tracker import BusyListener
from inference_node.errors import PstateBackendUnavailable, PstateError
from inference_node.gpu.backend import PSTATE_DRIVER_DECIDES, PstateBackend
from inference_node.gpu.control_state import Ask, GpuControl, LoopRequest, PstateEvent, PstateHealth
from inference_node.gpu.inventory import GpuInfo, GpuInventory
from inference_node.gpu.policy import PstatePolicy

log = logging.getLogger(__name__)

# A switch takes effect within milliseconds on the cards that have P-states; read it back soon,
# poll a little, and give up (NOT_WORKING) after a while.
READBACK_DELAY_S: Final = 0.2
READBACK_POLL_S: Final = 0.2
READBACK_TIMEOUT_S: Final = 3.0
# After a failed switch, wait before trying that GPU again so a broken GPU is not hammered.
SWITCH_RETRY_S: Final = 5.0
# Memory, temperature and power for status and metrics.
INVENTORY_REFRESH_S: Final = 5.0
# Releasing forced states at exit must not hang the shutdown.
RELEASE_TIMEOUT_S: Final = 5.0


__all__ = ["GpuControl", "PstateController", "PstateHealth"]

HeldByOthers = Callable[[list[GpuInfo]], Awaitable[Collection[str]]]


class BusySource(Protocol):
    """What the controller reads of activity (``ActivityService``; a ``BusyTracker`` in tests)."""

    def busy(self, instance: str) -> bool: ...

    def add_listener(self, listener: BusyListener) -> None: ...


class PstateController:
    """Applies ``PstatePolicy`` to each GPU from activity's busy/idle observations."""

    def __init__(self, inventory: GpuInventory, backend: PstateBackend, activity: BusySource, *,
                 low: int, high: int = PSTATE_DRIVER_DECIDES, low_delay_s: float,
                 enabled: bool = True, held_by_others: HeldByOthers | None = None) -> None:
        """``await held_by_others(gpus)`` names the GPUs (UUIDs) other programs compute on: they
        are never forced low, so the agent does not slow down work it did not start."""
        self.inventory = inventory
        self.backend = backend  # called from the control loop's task only
        self.activity = activity
        self.policy = PstatePolicy(low=low, high=high, low_delay_s=low_delay_s)
        self.enabled = enabled
        self.backend_problem: str | None = None
        self._gpus: dict[str, GpuControl] = {}
        self._instance_gpus: dict[str, frozenset[str]] = {}
        self._pulses: set[str] = set()  # instances that went busy since the last decision
        self._wakeup = trio.Event()
        self._accounted_at: float | None = None
        self._backend_opened = False
        self._held_by_others = held_by_others
        self._foreign: frozenset[str] = frozenset()  # GPUs other programs used at the last refresh
        self._sleeping = False  # released for a suspend: force nothing until resume
        self._requests_in, self._requests = trio.open_memory_channel[LoopRequest](math.inf)
        self._stopped = False  # run() ended: it released every forced state on its way out
        activity.add_listener(self.on_busy)

    def __repr__(self) -> str:
        states = ", ".join(f"{c.gpu.pci_bus_id}={'-' if c.applied is None else c.applied}"
                           f"/{c.health.value}" for c in self._gpus.values())
        return f"<PstateController {'on' if self.enabled else 'off'} [{states}]>"

    # -- inputs -------------------------------------------------------------------------------

    def on_busy(self, instance: str, busy: bool, t: float) -> None:
        """Tracker listener: wake the control loop at once on every busy/idle edge."""
        if busy:
            self._pulses.add(instance)  # a task that ends before the loop runs still counts
        self._wakeup.set()

    def set_instance_gpus(self, instance: str, uuids: Iterable[str]) -> None:
        """``instance`` runs on these GPUs (UUIDs); replaces what was known."""
        self._instance_gpus[instance] = frozenset(uuids)
        self._wakeup.set()

    def forget_instance(self, instance: str) -> None:
        self._instance_gpus.pop(instance, None)
        self._wakeup.set()

    def configure(self, *, low: int, high: int, low_delay_s: float, enabled: bool) -> None:
        """New settings (a config reload), used from the next decision on.

        Disabling releases every forced state; enabling opens the backend if it never was.
        """
        if (low, high, low_delay_s, enabled) != (self.policy.low, self.policy.high,
                                                 self.policy.low_delay_s, self.enabled):
            log.info("P-state settings: low P%d, high %d, low after %g s, %s", low, high,
                     low_delay_s, "enabled" if enabled else "disabled")
        self.policy.low, self.policy.high, self.policy.low_delay_s = low, high, low_delay_s
        self.enabled = enabled
        self._wakeup.set()

    async def release_all(self, reason: str) -> None:
        """Give every GPU back to the driver and keep it so until ``resume_control()`` (the
        machine is about to sleep: the driver must own the GPU across suspend).

        A request to the control loop, which alone calls the backend: returns once the loop
        has released every forced state (a GPU it cannot release is logged, and its status
        still shows the forced state). After ``run`` ended it returns at once: ``run``
        released everything on its way out.
        """
        if self._stopped:
            return
        request = LoopRequest(Ask.RELEASE, reason)
        self._requests_in.send_nowait(request)
        self._wakeup.set()
        await request.done.wait()

    def resume_control(self) -> None:
        """Switch P-states again after ``release_all`` (the machine is back); the loop takes
        the request after any earlier one, so a release and a resume never swap places."""
        self._requests_in.send_nowait(LoopRequest(Ask.RESUME, "resume"))
        self._wakeup.set()

    # -- outputs ------------------------------------------------------------------------------

    def gpus(self) -> list[GpuInfo]:
        """The latest inventory snapshot (NVML order), as the controller last refreshed it."""
        return [c.gpu for c in self._gpus.values()]

    def control(self, uuid: str) -> GpuControl:
        return self._gpus[uuid]

    def busy_gpus(self) -> set[str]:
        """GPUs (UUIDs) on which an instance runs a task now."""
        return {uuid for name, gpus in self._instance_gpus.items()
                if self.activity.busy(name) for uuid in gpus}

    def instances_on(self, uuid: str) -> list[str]:
        return sorted(name for name, gpus in self._instance_gpus.items() if uuid in gpus)

    def status(self, now: float | None = None) -> dict[str, Any]:
        """JSON-ready state of the inventory and of P-state control on every GPU."""
        if now is not None:
            self._account(now)
        gpus = []
        for c in self._gpus.values():
            entry = c.gpu.status()
            entry.update({
                "pstate_wanted": c.wanted, "pstate_applied": c.applied,
                "pstate_read_back": c.read_back, "pstate_control": c.health.value,
                "pstate_reason": c.reason, "activity": c.activity.value if c.activity else None,
                "switches": c.switches, "switch_failures": c.failures,
                "seconds_low": round(c.seconds["low"], 3),
                "seconds_high": round(c.seconds["high"], 3),
                "instances": self.instances_on(c.gpu.uuid),
                "used_by_other_programs": c.gpu.uuid in self._foreign,
            })
            gpus.append(entry)
        return {"enabled": self.enabled, "inventory_problem": self.inventory.problem,
                "backend": self.backend.name, "backend_problem": self.backend_problem,
                "low": self.policy.low, "high": self.policy.high,
                "low_delay_s": self.policy.low_delay_s, "gpus": gpus}

    # -- the task -----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Control P-states until cancelled; releases every forced state on the way out."""
        await self._start()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._refresh_loop)
                task_status.started()
                await self._control_loop()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(RELEASE_TIMEOUT_S) as scope:
                await self._release_all()
            if scope.cancelled_caught:
                log.error("releasing forced P-states took over %s s; some GPUs may stay forced",
                          RELEASE_TIMEOUT_S)
            self.backend.close()
            self._stopped = True
            self._answer_pending()

    async def _start(self) -> None:
        gpus = await trio.to_thread.run_sync(self.inventory.snapshot)
        self._gpus = {g.uuid: GpuControl(g) for g in gpus}
        await self._check_foreign()  # before the first decision: never force a GPU in use low
        if self.enabled:
            await self._open_backend()

    async def _open_backend(self) -> None:
        self._backend_opened = True
        gpus = [c.gpu for c in self._gpus.values()]
        if not gpus:
            return
        try:
            problems = await trio.to_thread.run_sync(self.backend.open, gpus)
        except PstateBackendUnavailable as exc:
            self.backend_problem = str(exc)
            log.warning("P-states cannot be switched: %s", exc)
            problems = {g.uuid: str(exc) for g in gpus}
        for control in self._gpus.values():
            problem = problems.get(control.gpu.uuid, f"{self.backend.name} did not report this GPU")
            if control.gpu.pstate_switchable is False:
                control.handle(PstateEvent.ONE_PSTATE, "one memory clock only, so one "
                               "P-state: nothing to switch (P100/V100-class GPU)")
            elif problem is not None:
                control.handle(PstateEvent.NO_BACKEND, problem)

    async def _control_loop(self) -> None:
        while True:
            self._wakeup = trio.Event()
            await self._serve_requests()
            now = trio.current_time()
            self._account(now)
            busy = {uuid: False for uuid in self._gpus}
            for name, uuids in self._instance_gpus.items():
                if self.activity.busy(name) or name in self._pulses:
                    for uuid in uuids & busy.keys():
                        busy[uuid] = True
            self._pulses.clear()
            for uuid in self._foreign & busy.keys():
                busy[uuid] = True
            decision = self.policy.decide(busy, now)
            for uuid, control in self._gpus.items():
                control.wanted = decision.wanted[uuid]
                control.activity = decision.activity[uuid]
            controlling = self.enabled and not self._sleeping
            if controlling:
                if not self._backend_opened:
                    await self._open_backend()
                await self._apply(now)
                await self._verify(trio.current_time())
            else:
                await self._release_all()
                # Nothing to read back or retry while released: a read-back that fell due
                # would otherwise wake this loop again at once, for ever.
                for control in self._gpus.values():
                    control.verify_due = math.inf
            wake_at = min([decision.wake_at, *(self._pending_times() if controlling else [])])
            with trio.move_on_at(wake_at):
                await self._wakeup.wait()

    async def _serve_requests(self) -> None:
        """Carry out the requests of other tasks, in the order they came."""
        while True:
            try:
                request = self._requests.receive_nowait()
            except trio.WouldBlock:
                return
            if request.ask is Ask.RELEASE:
                self._sleeping = True
                log.info("P-states: releasing every forced state (%s)", request.reason)
                await self._release_all()
            else:
                self._sleeping = False
            request.done.set()

    def _answer_pending(self) -> None:
        """``run`` ended and released what it could: nobody may wait for the loop any more."""
        while True:
            try:
                self._requests.receive_nowait().done.set()
            except trio.WouldBlock:
                return

    def _pending_times(self) -> list[float]:
        times = [c.verify_due for c in self._gpus.values()]
        times += [c.retry_at for c in self._gpus.values() if c.wanted != c.applied and
                  c.controllable and c.retry_at != -math.inf]
        return times

    async def _apply(self, now: float) -> None:
        todo = [c for c in self._gpus.values()
                if c.controllable and c.wanted is not None and c.wanted != c.applied
                and now >= c.retry_at]
        if not todo:
            return
        # Going high first: that is the switch a waiting prompt depends on.
        todo.sort(key=lambda c: c.wanted != self.policy.high)
        targets = [(c.gpu, c.wanted) for c in todo if c.wanted is not None]
        results = await trio.to_thread.run_sync(self._switch_all, targets)
        done = trio.current_time()
        self._account(done)
        for control, (pstate, error) in zip(todo, results, strict=True):
            self._record_switch(control, pstate, error, done)

    def _switch_all(self, targets: list[tuple[GpuInfo, int]]) -> list[tuple[int, str | None]]:
        results: list[tuple[int, str | None]] = []
        for gpu, pstate in targets:
            try:
                self.backend.set_pstate(gpu, pstate)
                results.append((pstate, None))
            except PstateError as exc:
                results.append((pstate, str(exc)))
        return results

    def _record_switch(self, control: GpuControl, pstate: int, error: str | None,
                       now: float) -> None:
        if error is not None:
            control.failures += 1
            control.retry_at = now + SWITCH_RETRY_S
            control.handle(PstateEvent.SWITCH_FAILED, error)
            return
        log.debug("GPU %s: P%d -> P%d", control.gpu.pci_bus_id,
                  -1 if control.applied is None else control.applied, pstate)
        control.applied = pstate
        control.switches += 1
        control.retry_at = -math.inf
        control.verify_target = pstate
        control.verify_due = now + READBACK_DELAY_S
        control.verify_deadline = now + READBACK_TIMEOUT_S

    async def _verify(self, now: float) -> None:
        due = [c for c in self._gpus.values() if c.verify_due <= now]
        if not due:
            return
        states = await trio.to_thread.run_sync(
            lambda: [self.inventory.performance_state(c.gpu.uuid) for c in due])
        for control, state in zip(due, states, strict=True):
            self._record_read_back(control, state, now)

    def _record_read_back(self, control: GpuControl, state: int | None, now: float) -> None:
        control.read_back = state
        target = control.verify_target
        if target is None or target != control.applied:
            control.verify_due = math.inf
            return
        if state is None:
            control.verify_due = math.inf
            control.handle(PstateEvent.READ_BACK_UNAVAILABLE,
                           "NVML cannot read this GPU's P-state back")
        elif target == PSTATE_DRIVER_DECIDES or state == target:
            # "Driver decides" has no single right answer; a call that returned OK is all we know.
            control.verify_due = math.inf
            if target != PSTATE_DRIVER_DECIDES:
                control.handle(PstateEvent.READ_BACK_MATCHED, f"P{target} set and read back")
        elif now >= control.verify_deadline:
            control.verify_due = math.inf
            control.handle(PstateEvent.READ_BACK_DIFFERS, (
                f"{self.backend.name} set P{target} without error but NVML reads P{state} after "
                f"{READBACK_TIMEOUT_S:g} s; the switch does not take on this GPU"))
        else:
            control.verify_due = now + READBACK_POLL_S

    async def _release_all(self) -> None:
        forced = [c for c in self._gpus.values()
                  if c.applied is not None and c.applied != PSTATE_DRIVER_DECIDES]
        if not forced:
            return
        targets = [(c.gpu, PSTATE_DRIVER_DECIDES) for c in forced]
        results = await trio.to_thread.run_sync(self._switch_all, targets)
        for control, (_, error) in zip(forced, results, strict=True):
            if error is None:
                control.applied = PSTATE_DRIVER_DECIDES
                log.info("GPU %s: forced P-state released", control.gpu.pci_bus_id)
            else:
                log.error("GPU %s: cannot release its forced P-state: %s",
                          control.gpu.pci_bus_id, error)

    async def _refresh_loop(self) -> None:
        while True:
            await trio.sleep(INVENTORY_REFRESH_S)
            fresh = await trio.to_thread.run_sync(self.inventory.snapshot)
            for gpu in fresh:
                if gpu.uuid in self._gpus:
                    control = self._gpus[gpu.uuid]
                    control.gpu = gpu
                    if gpu.pstate is not None:
                        control.read_back = gpu.pstate  # the freshest reading wins
            await self._check_foreign()

    async def _check_foreign(self) -> None:
        if self._held_by_others is None:
            return
        foreign = frozenset(await self._held_by_others(self.gpus()))
        if foreign != self._foreign:
            self._foreign = foreign
            self._wakeup.set()

    def _account(self, now: float) -> None:
        """Add the time since the last call to each GPU's low/high total (by applied state)."""
        last, self._accounted_at = self._accounted_at, now
        if last is None or now <= last:
            return
        for c in self._gpus.values():
            if c.applied is None:
                continue
            c.seconds["low" if c.applied == self.policy.low else "high"] += now - last
