"""The P-state controller over the fake rig: switching, read-back, failures, release at exit.

The NVAPI layer is the real ``NvapiBackend`` over ``FakeNvapiLibrary`` unless a test needs a
plain recording backend. Virtual time (autojump clock) runs the delays instantly.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import trio
import trio.testing

from inference_node.activity.parser import TaskFinished, TaskStarted
from inference_node.activity.tracker import BusyTracker
from inference_node.errors import IllegalPstateTransition
from inference_node.gpu.backend import PstateBackend
from inference_node.gpu.control_state import TRANSITIONS, GpuControl, PstateEvent
from inference_node.gpu.controller import (
    INVENTORY_REFRESH_S,
    READBACK_DELAY_S,
    READBACK_TIMEOUT_S,
    SWITCH_RETRY_S,
    PstateController,
    PstateHealth,
)
from inference_node.gpu.inventory import GpuInfo, GpuInventory, NoGpus
from inference_node.gpu.nvapi import NvapiBackend
from tests.fakes.gpu import (
    FakeNvapiLibrary,
    FakeNvml,
    FakeRig,
    OverlapDetectingBackend,
    RecordingBackend,
    three_gpu_rig,
)

LOW, HIGH = 8, 16
DELAY_S = 2.0
# Virtual seconds. The autojump clock advances in 10 ms poll steps while a worker thread runs,
# so a loaded machine burns virtual time; be generous, it costs nothing.
WAIT_S = 600.0


def nvapi_over(rig: FakeRig) -> NvapiBackend:
    lib = FakeNvapiLibrary(rig)
    return NvapiBackend(loader=lambda name: lib)


def make(rig: FakeRig, backend: PstateBackend | None = None,
         inventory: GpuInventory | None = None) -> tuple[PstateController, BusyTracker]:
    tracker = BusyTracker()
    controller = PstateController(inventory or FakeNvml(rig), backend or nvapi_over(rig), tracker,
                                  low=LOW, high=HIGH, low_delay_s=DELAY_S)
    return controller, tracker


REAL_WAIT_S = 30.0  # real seconds for worker threads on a loaded machine


async def until(condition: Callable[[], bool]) -> None:
    with trio.fail_after(WAIT_S):
        while not condition():
            await trio.sleep(0.01)


async def spin_until(condition: Callable[[], bool]) -> None:
    """Wait without letting virtual time pass (for a frozen MockClock)."""
    deadline = time.monotonic() + REAL_WAIT_S
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await trio.lowlevel.checkpoint()


async def spin_for(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await trio.lowlevel.checkpoint()


async def test_task_start_switches_only_its_gpu_high_at_once(
        mock_clock: trio.testing.MockClock) -> None:
    """Virtual time stands still: the switch up comes from the log event, not from a tick."""
    rig = three_gpu_rig()
    controller, tracker = make(rig)
    target = rig.gpus[2]  # NVML index 2, bus 0x81, NVAPI position 0
    controller.set_instance_gpus("qwen", [target.uuid])
    async with trio.open_nursery() as nursery:
        await nursery.start(controller.run)
        mock_clock.jump(DELAY_S)
        controls = [controller.control(g.uuid) for g in rig.gpus]
        await spin_until(lambda: all(c.applied == LOW for c in controls))  # idle at start: low
        started = trio.current_time()
        tracker.apply("qwen", TaskStarted(0, 1), started)
        await spin_until(lambda: controls[2].applied == HIGH)
        assert target.pstate == 0  # 16: the driver decides (P0 on the fake)
        assert trio.current_time() == started
        assert [g.pstate for g in rig.gpus] == [LOW, LOW, 0]
        tracker.apply("qwen", TaskFinished(0, 1), trio.current_time())
        await spin_for(0.2)
        assert target.pstate == 0  # not before the delay
        mock_clock.jump(DELAY_S)
        await spin_until(lambda: controls[2].applied == LOW)
        assert target.pstate == LOW
        mock_clock.jump(1.0)  # let the read-back of P8 fall due
        await spin_until(lambda: controls[2].health is PstateHealth.OK)
        status = controller.status(trio.current_time())
        entry = next(g for g in status["gpus"] if g["uuid"] == target.uuid)
        assert entry["pstate_control"] == "ok" and entry["instances"] == ["qwen"]
        assert entry["switches"] == 4 and entry["seconds_low"] > 0
        nursery.cancel_scope.cancel()
    assert rig.switches_of(target.pci_bus_id) == [HIGH, LOW, HIGH, LOW, HIGH]  # released at exit
    for other in rig.gpus[:2]:
        assert rig.switches_of(other.pci_bus_id) == [HIGH, LOW, HIGH]


async def test_a_task_shorter_than_one_loop_turn_still_switches_high(
        autojump_clock: trio.testing.MockClock) -> None:
    rig = three_gpu_rig()
    controller, tracker = make(rig, RecordingBackend(rig))
    gpu = rig.gpus[0]
    controller.set_instance_gpus("a", [gpu.uuid])
    async with trio.open_nursery() as nursery:
        await nursery.start(controller.run)
        await until(lambda: gpu.pstate == LOW)
        tracker.apply("a", TaskStarted(0, 1), trio.current_time())
        tracker.apply("a", TaskFinished(0, 1), trio.current_time())
        await until(lambda: rig.switches_of(gpu.pci_bus_id)[-2:] == [HIGH, LOW])
        nursery.cancel_scope.cancel()


async def test_a_switch_that_does_not_read_back_is_not_working(
        autojump_clock: trio.testing.MockClock) -> None:
    rig = three_gpu_rig()
    rig.gpus[1].sticky = True  # NVAPI answers OK, the GPU stays in P0
    controller, _ = make(rig)
    async with trio.open_nursery() as nursery:
        await nursery.start(controller.run)
        stuck = controller.control(rig.gpus[1].uuid)
        await until(lambda: stuck.health is PstateHealth.NOT_WORKING)
        assert stuck.applied == LOW and stuck.read_back == 0
        assert "NVML reads P0" in stuck.reason and f"{READBACK_TIMEOUT_S:g} s" in stuck.reason
        assert controller.control(rig.gpus[0].uuid).health is PstateHealth.OK
        entry = controller.status()["gpus"][1]
        assert entry["pstate_control"] == "not-working" and entry["pstate_read_back"] == 0
        nursery.cancel_scope.cancel()


async def test_a_failing_switch_is_reported_and_retried_later(
        mock_clock: trio.testing.MockClock) -> None:
    rig = three_gpu_rig()
    rig.gpus[0].fail_code = -104
    controller, _ = make(rig)
    async with trio.open_nursery() as nursery:
        await nursery.start(controller.run)
        broken = controller.control(rig.gpus[0].uuid)
        await spin_until(lambda: broken.failures == 1)
        assert broken.health is PstateHealth.NOT_WORKING and "-104" in broken.reason
        await spin_for(0.2)
        assert broken.failures == 1  # no hammering while the retry time has not come
        mock_clock.jump(SWITCH_RETRY_S)
        await spin_until(lambda: broken.failures == 2)
        rig.gpus[0].fail_code = 0  # the GPU recovers
        mock_clock.jump(SWITCH_RETRY_S + DELAY_S)
        await spin_until(lambda: broken.applied == LOW)
        mock_clock.jump(1.0)
        await spin_until(lambda: broken.health is PstateHealth.OK)
        nursery.cancel_scope.cancel()


async def test_single_pstate_gpus_and_a_missing_library_are_reported_not_switched(
        autojump_clock: trio.testing.MockClock) -> None:
    rig = three_gpu_rig()
    rig.gpus[0].memory_clocks = 1  # a P100: one memory clock, one P-state
    controller, _ = make(rig)
    async with trio.open_nursery() as nursery:
        await nursery.start(controller.run)
        await until(lambda: rig.gpus[1].pstate == LOW)
        single = controller.control(rig.gpus[0].uuid)
        assert single.health is PstateHealth.UNSUPPORTED and "one P-state" in single.reason
        assert rig.switches_of(rig.gpus[0].pci_bus_id) == []
        nursery.cancel_scope.cancel()

    rig = three_gpu_rig()
    controller, _ = make(rig, NvapiBackend(library_names=["libnvidia-api-missing.so.1"]))
    async with trio.open_nursery() as nursery:
        await nursery.start(controller.run)
        await trio.sleep(DELAY_S * 2)
        status = controller.status()
        assert "libnvidia-api-missing.so.1 not found" in status["backend_problem"]
        assert {g["pstate_control"] for g in status["gpus"]} == {"no-backend"}
        assert {g["pstate_wanted"] for g in status["gpus"]} == {LOW}  # still visible
        assert rig.switches == []
        nursery.cancel_scope.cancel()


async def test_a_crashing_controller_releases_forced_states(
        autojump_clock: trio.testing.MockClock) -> None:
    rig = three_gpu_rig()

    class BrokenReadBack(FakeNvml):
        armed = False

        def performance_state(self, uuid: str) -> int | None:
            if self.armed:
                raise RuntimeError("NVML bug")
            return super().performance_state(uuid)

    inventory = BrokenReadBack(rig)
    controller, tracker = make(rig, RecordingBackend(rig), inventory)
    controller.set_instance_gpus("a", [rig.gpus[0].uuid])
    with pytest.raises(BaseExceptionGroup) as crash:
        async with trio.open_nursery() as nursery:
            await nursery.start(controller.run)
            await until(lambda: all(g.pstate == LOW for g in rig.gpus))
            inventory.armed = True
            tracker.apply("a", TaskStarted(0, 1), trio.current_time())  # switch, then read back
            await trio.sleep(WAIT_S)
    assert crash.group_contains(RuntimeError, match="NVML bug", depth=None)
    assert all(g.pstate == 0 for g in rig.gpus)  # every GPU released to "driver decides"
    assert [rig.switches_of(g.pci_bus_id)[-1] for g in rig.gpus] == [HIGH, HIGH, HIGH]


async def test_cpu_only_mode_runs_quietly(autojump_clock: trio.testing.MockClock) -> None:
    tracker = BusyTracker()
    rig = FakeRig([])
    controller = PstateController(NoGpus("libnvidia-ml.so.1 not found"), RecordingBackend(rig),
                                  tracker, low=LOW, low_delay_s=DELAY_S)
    async with trio.open_nursery() as nursery:
        await nursery.start(controller.run)
        tracker.apply("a", TaskStarted(0, 1), trio.current_time())
        await trio.sleep(DELAY_S * 2)
        status = controller.status()
        assert status["gpus"] == [] and "libnvidia-ml" in status["inventory_problem"]
        nursery.cancel_scope.cancel()


async def test_reload_can_disable_and_enable_switching(
        autojump_clock: trio.testing.MockClock) -> None:
    rig = three_gpu_rig()
    tracker = BusyTracker()
    controller = PstateController(FakeNvml(rig), nvapi_over(rig), tracker, low=LOW,
                                  low_delay_s=DELAY_S, enabled=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(controller.run)
        await trio.sleep(DELAY_S * 2)
        assert rig.switches == []  # disabled from the start: the backend is not even opened
        controller.configure(low=LOW, high=HIGH, low_delay_s=DELAY_S, enabled=True)
        await until(lambda: all(g.pstate == LOW for g in rig.gpus))
        controller.configure(low=LOW, high=HIGH, low_delay_s=DELAY_S, enabled=False)
        controls = [controller.control(g.uuid) for g in rig.gpus]
        await until(lambda: all(c.applied == HIGH for c in controls))  # released
        assert all(g.pstate == 0 for g in rig.gpus)
        controller.configure(low=12, high=HIGH, low_delay_s=DELAY_S, enabled=True)
        await until(lambda: all(g.pstate == 12 for g in rig.gpus))  # the new low state
        nursery.cancel_scope.cancel()


async def test_a_gpu_other_programs_compute_on_is_never_forced_low(
        autojump_clock: trio.testing.MockClock) -> None:
    rig = three_gpu_rig()
    tracker = BusyTracker()
    others: set[str] = {rig.gpus[1].uuid}  # say, a training job nobody told the agent about

    async def held_by_others(gpus: list[GpuInfo]) -> set[str]:
        return set(others)

    controller = PstateController(FakeNvml(rig), nvapi_over(rig), tracker, low=LOW,
                                  low_delay_s=DELAY_S, held_by_others=held_by_others)
    async with trio.open_nursery() as nursery:
        await nursery.start(controller.run)
        await until(lambda: rig.gpus[0].pstate == LOW and rig.gpus[2].pstate == LOW)
        await trio.sleep(INVENTORY_REFRESH_S * 3)
        assert rig.switches_of(rig.gpus[1].pci_bus_id) == [HIGH]
        assert controller.status()["gpus"][1]["used_by_other_programs"] is True
        others.clear()  # the job ended: the next inventory refresh lets the GPU go low
        await until(lambda: rig.gpus[1].pstate == LOW)
        nursery.cancel_scope.cancel()


async def test_disabling_with_a_read_back_due_leaves_the_loop_asleep(
        mock_clock: trio.testing.MockClock) -> None:
    """A read-back that falls due while switching is off must not wake the loop for ever
    (a busy loop there starves every other task, and froze virtual time in these tests)."""
    rig = three_gpu_rig()
    controller, _ = make(rig)
    async with trio.open_nursery() as nursery:
        await nursery.start(controller.run)
        mock_clock.jump(DELAY_S)
        controls = [controller.control(g.uuid) for g in rig.gpus]
        await spin_until(lambda: all(c.applied == LOW for c in controls))
        controller.configure(low=LOW, high=HIGH, low_delay_s=DELAY_S, enabled=False)
        mock_clock.jump(READBACK_DELAY_S * 2)  # the read-back of P8 falls due, unread
        await spin_until(lambda: all(c.applied == HIGH for c in controls))
        await spin_for(0.1)
        turn = controller._wakeup  # a new event per loop turn
        await spin_for(0.3)
        assert controller._wakeup is turn, "the control loop keeps turning while disabled"
        nursery.cancel_scope.cancel()


RACE_ROUNDS = 30


async def test_a_release_for_a_suspend_never_overlaps_the_control_loop() -> None:
    """The power path releases while the loop switches busily: every backend call still
    comes from one thread at a time, and each release returns with every GPU released."""
    rig = three_gpu_rig()
    backend = OverlapDetectingBackend(rig)
    tracker = BusyTracker()
    controller = PstateController(FakeNvml(rig), backend, tracker, low=LOW, high=HIGH,
                                  low_delay_s=0.0)
    for gpu in rig.gpus:
        controller.set_instance_gpus(f"on-{gpu.pci_bus_id}", [gpu.uuid])

    async def flip_activity() -> None:  # busy and idle edges as fast as the loop takes them
        task = 0
        while True:
            task += 1
            for gpu in rig.gpus:
                name = f"on-{gpu.pci_bus_id}"
                tracker.apply(name, TaskStarted(0, task), trio.current_time())
                await trio.sleep(0.001)
                tracker.apply(name, TaskFinished(0, task), trio.current_time())
            await trio.sleep(0.001)

    released_ok = 0
    async with trio.open_nursery() as nursery:
        await nursery.start(controller.run)
        controls = [controller.control(g.uuid) for g in rig.gpus]
        nursery.start_soon(flip_activity)
        for _ in range(RACE_ROUNDS):
            with trio.fail_after(REAL_WAIT_S):
                while not any(c.applied == LOW for c in controls):
                    await trio.sleep(0.001)
            await controller.release_all("test suspend")
            released_ok += all(c.applied in (None, HIGH) for c in controls)
            controller.resume_control()
        nursery.cancel_scope.cancel()
    assert backend.overlaps == 0, f"{backend.overlaps} backend calls overlapped another"
    assert released_ok == RACE_ROUNDS  # each release returned after the loop applied it
    assert backend.calls > RACE_ROUNDS  # the loop switched between the releases


def test_control_health_moves_by_its_table() -> None:
    control = GpuControl(FakeNvml(three_gpu_rig()).snapshot()[0])
    control.handle(PstateEvent.READ_BACK_MATCHED, "P8 set and read back")
    assert control.health is PstateHealth.OK
    control.handle(PstateEvent.SWITCH_FAILED, "refused")
    assert control.health is PstateHealth.NOT_WORKING and control.reason == "refused"
    # The backend is opened before any switch: a GPU under control cannot lose it later.
    with pytest.raises(IllegalPstateTransition, match="event no-backend is not allowed in state "
                                                "NOT_WORKING"):
        control.handle(PstateEvent.NO_BACKEND, "late")
    single = GpuControl(control.gpu)
    single.handle(PstateEvent.ONE_PSTATE, "one memory clock")
    with pytest.raises(IllegalPstateTransition, match="in state UNSUPPORTED"):
        single.handle(PstateEvent.READ_BACK_MATCHED, "P8")
    assert all(set(moves) <= set(PstateEvent) for moves in TRANSITIONS.values())


async def test_a_release_after_the_loop_ended_returns_at_once(
        autojump_clock: trio.testing.MockClock) -> None:
    rig = three_gpu_rig()
    controller, _ = make(rig, RecordingBackend(rig))
    async with trio.open_nursery() as nursery:
        await nursery.start(controller.run)
        await until(lambda: all(g.pstate == LOW for g in rig.gpus))
        nursery.cancel_scope.cancel()
    assert all(g.pstate == 0 for g in rig.gpus)  # released on the way out
    with trio.fail_after(1):
        await controller.release_all("suspending")  # nobody left to ask: nothing forced
