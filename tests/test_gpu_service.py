"""The activity/P-state component inside a real node-agent: CPU-only (this machine) and on a
fake 3-GPU rig; its API routes, metrics and ``node-agent status``; the GPU table."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Any

import httpx
import tomli_w
import trio

from inference_node.activity.service import ActivityService
from inference_node.agent import Agent, Component, Parts, build_parts, run_agent
from inference_node.gpu.nvapi import NvapiBackend
from inference_node.gpu.report import activity_cells, format_gpu_table
from inference_node.gpu.service import PstateService
from inference_node.supervisor import State
from tests.fakes.gpu import FakeNvapiLibrary, FakeNvml, RecordingBackend, three_gpu_rig
from tests.support.ports import free_port
from tests.support.supervised import STATE_TIMEOUT_S, wait_state

TOKEN = "gpu-test-token"
REQUEST_TIMEOUT_S = 60.0
CLI_TIMEOUT_S = 60.0


def write_config(tmp_path: Path, binary: Path, model: Path, port: int, **extra: Any) -> Path:
    path = tmp_path / "node-agent.toml"
    path.write_text(tomli_w.dumps({
        "agent": {"api_listen": "127.0.0.1:0", "state_file": str(tmp_path / "state.toml"),
                  "token": TOKEN},
        "pstate": {"low_delay_s": 0.5},
        "instances": {"tiny": {
            "binary": str(binary), "model": str(model), "port": port,
            "args": ["-lv", "4", "-c", "256", "-np", "2", "-t", "1", "--metrics"],
            "health": {"interval_s": 0.05}, "stop_timeout_s": 5, **extra,
        }},
    }))
    return path


async def test_agent_reports_activity_gpus_and_metrics(
        llama_server_bin: Path, tiny_model: Path, tmp_path: Path) -> None:
    port = free_port()
    cfg = write_config(tmp_path, llama_server_bin, tiny_model, port)
    made: list[Parts] = []

    def components(agent: Agent) -> list[Component]:  # the agent's own parts, kept to look at
        made.append(build_parts(agent))
        return made[-1].components()

    async with trio.open_nursery() as nursery:
        agent: Agent = await nursery.start(functools.partial(run_agent, cfg,
                                                             make_components=components))
        await wait_state(agent.supervisor, "tiny", State.READY)
        tracking = made[0].activity
        async with httpx.AsyncClient(base_url=agent.api_urls[0], timeout=REQUEST_TIMEOUT_S,
                                     headers={"Authorization": f"Bearer {TOKEN}"}) as api:
            r = await httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S).post(
                f"http://127.0.0.1:{port}/completion", json={"prompt": "hi", "n_predict": 8})
            r.raise_for_status()
            with trio.fail_after(STATE_TIMEOUT_S):  # the release line may trail the answer
                while tracking.tracker.instance("tiny").tasks_finished < 1:
                    await trio.sleep(0.02)
            await tracking.reconciler.check_all(httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S))
            activity = (await api.get("/v1/activity")).json()["instances"]["tiny"]
            gpus = (await api.get("/v1/gpus")).json()
            metrics = (await api.get("/metrics")).text
            assert tracking.tasks_in_progress() == {"tiny": 0}
            assert tracking.last_task_end("tiny") is not None

            cli = await trio.run_process(
                [sys.executable, "-m", "inference_node", "status", "--url", agent.api_urls[0],
                 "--token-file", str(_token_file(tmp_path))],
                capture_stdout=True, capture_stderr=True, check=False)
        agent.request_shutdown()

    assert activity["busy"] is False and activity["tasks_started"] == 1
    assert activity["model_loaded"] is True and ("kv:CPU" in activity["buffers_mib"])
    assert activity["tokens_per_second"] is not None
    # No NVIDIA driver on this machine: CPU-only, said once, not an error.
    assert gpus["gpus"] == [] and "libnvidia-ml" in gpus["inventory_problem"]
    assert 'llamanap_instance_tasks_total{instance="tiny"} 1.0' in metrics
    assert "llamanap_pstate_backend_available 0.0" in metrics
    out = cli.stdout.decode()
    assert cli.returncode == 0, cli.stderr.decode()
    header, row = out.splitlines()[:2]
    assert "BUSY" in header and "TASKS" in header and "TOK/S" in header
    assert row.split()[:7][-2:] == ["no", "1"]  # BUSY no, TASKS 1
    assert "GPUs: none managed (CPU-only" in out


def _token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN)
    return path


async def test_gpu_table_lists_cuda_order_and_problems(
        autojump_clock: trio.testing.MockClock) -> None:
    from inference_node.activity.tracker import BusyTracker
    from inference_node.gpu.controller import PstateController, PstateHealth

    rig = three_gpu_rig()
    rig.gpus[2].sticky = True  # bus 0x81: switches "succeed", NVML disagrees
    controller = PstateController(FakeNvml(rig), RecordingBackend(rig), BusyTracker(), low=8,
                                  low_delay_s=1.0)
    controller.set_instance_gpus("qwen", [rig.gpus[0].uuid])
    async with trio.open_nursery() as nursery:
        await nursery.start(controller.run)
        with trio.fail_after(600):
            while controller.control(rig.gpus[2].uuid).health is not PstateHealth.NOT_WORKING:
                await trio.sleep(0.1)
        text = format_gpu_table(controller.status(trio.current_time()))
        nursery.cancel_scope.cancel()
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["GPU", "PCI", "NAME"]
    # CUDA order (PCI bus), not NVML's: 0x01, 0x41, 0x81.
    assert [line.split()[1] for line in lines[1:4]] == ["0000:01:00.0", "0000:41:00.0",
                                                        "0000:81:00.0"]
    assert "qwen" in lines[2] and "P8 -> P8" in lines[2]
    assert lines[4].startswith("GPU 0000:81:00.0: not-working:")
    assert activity_cells(None) == ("-", "-", "-")


async def test_agent_with_fake_gpus_switches_reports_and_releases(
        llama_server_bin: Path, tiny_model: Path, tmp_path: Path) -> None:
    rig = three_gpu_rig()
    lib = FakeNvapiLibrary(rig)
    port = free_port()
    cfg = write_config(tmp_path, llama_server_bin, tiny_model, port, gpus=[1])

    made: list[PstateService] = []

    def components(agent: Agent) -> list[Component]:
        # Activity and P-states only, wired as the agent's root does, on the fake rig.
        activity = ActivityService(agent.supervisor)
        made.append(PstateService(agent.supervisor, activity, FakeNvml(rig),
                                  NvapiBackend(loader=lambda name: lib), agent.config.pstate))
        agent.supervisor.add_line_sink(activity.feed)
        agent.supervisor.add_state_listener(activity.on_state)
        agent.supervisor.add_state_listener(made[-1].on_state)
        return [activity, made[-1]]

    target = rig.by_bus("0000:41:00.0")  # CUDA index 1 in PCI_BUS_ID order
    busy_elsewhere = rig.by_bus("0000:81:00.0")
    busy_elsewhere.processes = (os.getpid(),)  # a program the agent did not start
    async with trio.open_nursery() as nursery:
        agent: Agent = await nursery.start(functools.partial(run_agent, cfg,
                                                             make_components=components))
        await wait_state(agent.supervisor, "tiny", State.READY)
        service = made[0]
        control = service.controller.control(target.uuid)
        # Our own llama-server on a GPU is not "another program"; the test process is.
        target.processes = (agent.supervisor.get("tiny").child.pid,)  # type: ignore[union-attr]
        assert await service.held_by_others(FakeNvml(rig).snapshot()) == {busy_elsewhere.uuid}
        target.processes = ()
        with trio.fail_after(STATE_TIMEOUT_S):
            while control.applied != 8:
                await trio.sleep(0.02)
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as client:
            r = await client.post(f"http://127.0.0.1:{port}/completion",
                                  json={"prompt": "hi", "n_predict": 8})
            r.raise_for_status()
        with trio.fail_after(STATE_TIMEOUT_S):
            while not (rig.switches_of(target.pci_bus_id)[-2:] == [16, 8]
                       and control.applied == 8):
                await trio.sleep(0.02)
        async with httpx.AsyncClient(base_url=agent.api_urls[0], timeout=REQUEST_TIMEOUT_S,
                                     headers={"Authorization": f"Bearer {TOKEN}"}) as api:
            gpus = (await api.get("/v1/gpus")).json()
            metrics = (await api.get("/metrics")).text
        cli = await trio.run_process(
            [sys.executable, "-m", "inference_node", "status", "--url", agent.api_urls[0],
             "--token-file", str(_token_file(tmp_path))],
            capture_stdout=True, capture_stderr=True, check=False)
        agent.request_shutdown()

    entry = next(g for g in gpus["gpus"] if g["uuid"] == target.uuid)
    assert entry["instances"] == ["tiny"] and entry["switches"] >= 3
    assert [g["instances"] for g in gpus["gpus"] if g["uuid"] != target.uuid] == [[], []]
    assert (f'llamanap_gpu_pstate_switches_total{{name="Tesla P40",pci_bus_id="0000:41:00.0",'
            f'uuid="{target.uuid}"}}') in metrics
    assert "llamanap_pstate_backend_available 1.0" in metrics
    table = cli.stdout.decode().split("\n\n")[1].splitlines()
    assert table[0].startswith("GPU") and "tiny" in table[2] and "0000:41:00.0" in table[2]
    assert rig.switches_of(busy_elsewhere.pci_bus_id) == [16]  # never forced low
    # The agent stopped: every GPU it forced low is back to "driver decides".
    assert all(rig.switches_of(g.pci_bus_id)[-1] == 16 for g in rig.gpus)
