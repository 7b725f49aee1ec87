"""End to end: real llama-servers under the real supervisor, P-states on a fake 3-GPU rig.

The rig's NVML, CUDA (PCI bus) and NVAPI orders all differ; the P-state backend is the real
``NvapiBackend`` over a fake libnvidia-api. Instances (GPU indices in CUDA's PCI_BUS_ID order):

    alpha  gpus = [1]               (bus 0x41)
    beta   gpus = [UUID of GPU 1]   (bus 0x41, shared with alpha)
    gamma  gpus = [0]               (bus 0x01)
    delta  gpus = [1, 2]            (bus 0x41 and 0x81)

Requests go to one group at a time, then to all at once. From the merged timeline of busy
edges (tracker listener) and switches that reached a GPU (fake NVAPI), every GPU must go high
only because an instance on it started a task, be high whenever one of its instances works,
and go low only after all of its instances were idle for ``low_delay_s``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import trio

from inference_node.activity.service import ActivityService
from inference_node.gpu.controller import PstateController
from inference_node.gpu.nvapi import NvapiBackend
from inference_node.gpu.service import PstateService
from inference_node.supervisor import Supervisor
from shared.config.node import PstateSection
from tests.fakes.gpu import FakeNvapiLibrary, FakeNvml, FakeRig, Switch, three_gpu_rig
from tests.support.ports import free_port
from tests.support.supervised import STATE_TIMEOUT_S, instance

LOW, HIGH = 8, 16
# Long enough that back-to-back requests on a loaded 2-core machine never let a GPU drop.
LOW_DELAY_S = 1.0
REQUEST_TIMEOUT_S = 60.0
SETTLE_TIMEOUT_S = 60.0
ARGS = ["-lv", "4", "-c", "256", "-np", "2", "-t", "1", "--no-warmup"]
BUS = {0: "0000:01:00.0", 1: "0000:41:00.0", 2: "0000:81:00.0"}  # CUDA index -> PCI bus id


@dataclass(frozen=True)
class Edge:
    t: float
    instance: str
    busy: bool


def scenario(rig: FakeRig) -> dict[str, list[int | str]]:
    gpu1_uuid = rig.by_bus(BUS[1]).uuid
    return {"alpha": [1], "beta": [gpu1_uuid], "gamma": [0], "delta": [1, 2]}


ON_GPU = {BUS[0]: {"gamma"}, BUS[1]: {"alpha", "beta", "delta"}, BUS[2]: {"delta"}}


async def settle_low(controller: PstateController, activity: ActivityService,
                     rig: FakeRig) -> None:
    """Wait until no instance works and every GPU is applied low."""
    with trio.fail_after(SETTLE_TIMEOUT_S):
        while not all(controller.control(g.uuid).applied == LOW for g in rig.gpus) \
                or activity.tracker.busy_instances():
            await trio.sleep(0.02)


def pstate_service(supervisor: Supervisor, rig: FakeRig,
                   backend: NvapiBackend) -> tuple[ActivityService, PstateService]:
    """Activity and P-states over the rig, subscribed as the agent's root does."""
    activity = ActivityService(supervisor)
    service = PstateService(supervisor, activity, FakeNvml(rig), backend,
                            PstateSection(low=LOW, high=HIGH, low_delay_s=LOW_DELAY_S))
    supervisor.add_line_sink(activity.feed)
    supervisor.add_state_listener(activity.on_state)
    supervisor.add_state_listener(service.on_state)
    return activity, service


def switches_since(rig: FakeRig, mark: int) -> dict[str, list[int]]:
    with rig.lock:
        recent = rig.switches[mark:]
    return {bus: [s.pstate for s in recent if s.pci_bus_id == bus] for bus in BUS.values()}


async def test_each_gpu_follows_the_instances_on_it(llama_server_bin: Path, tiny_model: Path,
                                                    tmp_path: Path) -> None:
    rig = three_gpu_rig()
    lib = FakeNvapiLibrary(rig)
    supervisor = Supervisor()
    activity, service = pstate_service(supervisor, rig, NvapiBackend(loader=lambda name: lib))
    edges: list[Edge] = []
    activity.add_listener(lambda name, busy, t: edges.append(
        Edge(time.perf_counter(), name, busy)))
    ports = {name: free_port() for name in scenario(rig)}
    configs = {name: instance(name, {"binary": str(llama_server_bin), "model": str(tiny_model),
                                     "port": ports[name], "args": ARGS, "gpus": gpus},
                              tmp_path / "node-agent.toml")
               for name, gpus in scenario(rig).items()}

    async with trio.open_nursery() as nursery, \
            httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as client:
        await nursery.start(supervisor.run)
        await nursery.start(activity.run)
        await nursery.start(service.run)
        await supervisor.apply(configs, {n: True for n in configs}, "test")
        assert await supervisor.wait_all_ready(STATE_TIMEOUT_S)
        # The service learnt each instance's GPUs from the env the supervisor gave its child.
        assert {n: {rig.by_bus(b).uuid for b in BUS.values() if n in ON_GPU[b]}
                for n in configs} == {n: set(a.gpus) for n, a in service.assignments.items()}
        assert all(not a.problems for a in service.assignments.values())
        await settle_low(service.controller, activity, rig)

        async def ask(name: str, n: int) -> None:
            for i in range(n):
                r = await client.post(f"http://127.0.0.1:{ports[name]}/completion",
                                      json={"prompt": f"{name} {i}", "n_predict": 16})
                r.raise_for_status()

        def finished() -> int:
            return sum(activity.tracker.instance(n).tasks_finished for n in configs)

        async def burst(names: list[str], n: int) -> dict[str, list[int]]:
            mark, done = len(rig.switches), finished()
            async with trio.open_nursery() as requests:
                for name in names:
                    requests.start_soon(ask, name, n)
            with trio.fail_after(SETTLE_TIMEOUT_S):  # the log lines may trail the responses
                while finished() < done + n * len(names):
                    await trio.sleep(0.02)
            await settle_low(service.controller, activity, rig)
            return switches_since(rig, mark)

        # One group at a time: only that group's GPUs switch, once up and once down (back-to-back
        # requests do not flap the GPU).
        assert await burst(["gamma"], 3) == {BUS[0]: [HIGH, LOW], BUS[1]: [], BUS[2]: []}
        assert await burst(["alpha", "beta"], 3) == {BUS[0]: [], BUS[1]: [HIGH, LOW], BUS[2]: []}
        assert await burst(["delta"], 2) == {BUS[0]: [], BUS[1]: [HIGH, LOW],
                                             BUS[2]: [HIGH, LOW]}
        everyone = await burst(["alpha", "beta", "gamma", "delta"], 4)
        assert all(s[:1] == [HIGH] and s[-1:] == [LOW] for s in everyone.values())
        status = service.gpu_status()
        before_exit = len(rig.switches)
        nursery.cancel_scope.cancel()

    assert {g["pstate_control"] for g in status["gpus"]} == {"ok"}
    assert sum(activity.tracker.instance(n).tasks_started for n in configs) == 3 + 6 + 2 + 16
    check_timeline(rig.switches[:before_exit], edges)
    # The controller released every GPU when it stopped.
    assert switches_since(rig, before_exit) == {bus: [HIGH] for bus in BUS.values()}


def check_timeline(switches: list[Switch], edges: list[Edge]) -> None:
    """Replay busy edges and switches in time order and check the rules per GPU."""
    events: list[tuple[float, Edge | Switch]] = [(e.t, e) for e in edges]
    events += [(s.t, s) for s in switches]
    events.sort(key=lambda e: e[0])
    busy: set[str] = set()
    applied: dict[str, int | None] = dict.fromkeys(BUS.values())
    caused: dict[str, bool] = dict.fromkeys(BUS.values(), False)  # a start since the last switch
    owed: dict[str, bool] = dict.fromkeys(BUS.values(), False)  # started while low: high is owed
    last_idle: dict[str, float] = dict.fromkeys(BUS.values(), -1e9)
    for t, item in events:
        if isinstance(item, Edge):
            for bus, names in ON_GPU.items():
                if item.instance not in names:
                    continue
                if item.busy:
                    caused[bus] = True
                    owed[bus] = owed[bus] or applied[bus] != HIGH
                elif not busy & names - {item.instance}:
                    last_idle[bus] = t
            (busy.add if item.busy else busy.discard)(item.instance)
            continue
        switch = item
        assert switch.pci_bus_id in BUS.values(), f"switched a GPU of no instance: {switch}"
        bus = switch.pci_bus_id
        if switch.pstate == HIGH and applied[bus] == LOW:
            assert caused[bus], f"{bus} went high at {t} with no task started on it"
            owed[bus] = False
        elif switch.pstate == LOW:
            assert not owed[bus], f"{bus} went low while a task on it never got it high"
            assert t - last_idle[bus] >= LOW_DELAY_S, f"{bus} went low {t - last_idle[bus]:.3f} s " \
                "after its last instance went idle"
        applied[bus] = switch.pstate
        caused[bus] = False
    assert not any(owed.values())


async def test_a_child_killed_mid_task_releases_its_gpu(llama_server_bin: Path, tiny_model: Path,
                                                        tmp_path: Path) -> None:
    """The release line never comes; the supervisor's state change ends the task."""
    rig = three_gpu_rig()
    supervisor = Supervisor()
    activity, service = pstate_service(supervisor, rig,
                                       NvapiBackend(loader=lambda name: FakeNvapiLibrary(rig)))
    port = free_port()
    config = instance("solo", {"binary": str(llama_server_bin), "model": str(tiny_model),
                               "port": port, "gpus": [2],
                               "args": ["-lv", "4", "-c", "2048", "-np", "1", "-t", "1"]},
                      tmp_path / "node-agent.toml")
    gpu = service.controller
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        await nursery.start(activity.run)
        await nursery.start(service.run)
        await supervisor.apply({"solo": config}, {"solo": True}, "test")
        assert await supervisor.wait_all_ready(STATE_TIMEOUT_S)
        uuid = rig.by_bus(BUS[2]).uuid
        await settle_low(gpu, activity, rig)

        async def long_request() -> None:
            async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as client:
                with contextlib.suppress(httpx.TransportError):  # the server dies under it
                    await client.post(f"http://127.0.0.1:{port}/completion",
                                      json={"prompt": "go", "n_predict": 2000, "ignore_eos": True})

        nursery.start_soon(long_request)
        with trio.fail_after(SETTLE_TIMEOUT_S):
            while not (activity.busy("solo") and gpu.control(uuid).applied == HIGH):
                await trio.sleep(0.01)
        first_pid = supervisor.get("solo").child.pid  # type: ignore[union-attr]
        os.kill(first_pid, signal.SIGKILL)
        await settle_low(gpu, activity, rig)  # no release line came: the state change reset the instance
        assert not activity.busy("solo")
        assert await supervisor.wait_all_ready(STATE_TIMEOUT_S)
        assert supervisor.get("solo").child.pid != first_pid  # type: ignore[union-attr]
        assert service.assignments["solo"].gpus == (uuid,)
        nursery.cancel_scope.cancel()
