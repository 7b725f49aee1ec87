"""What is loaded on each GPU: the sum of the placement estimates, the sum of what
llama-server reported, and ``empty`` where nothing is: the pure sum, and the running agent
on the recording NVML fake (three GPUs) with a real llama-server and a real process that
prints a GPU llama-server's buffer lines."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Final

import httpx
import pytest
import tomli_w
import trio

from inference_node.agent import Agent, Component, build_parts, run_agent
from inference_node.gpu.memory import GpuMemory, gpu_memory
from inference_node.placement.measured import parse_memory
from inference_node.supervisor import State
from tests.fakes.gpu import FakeNvml, RecordingBackend, three_gpu_rig
from tests.support.ports import free_port
from tests.support.supervised import toy_command, wait_state

A, B, C = "GPU-a", "GPU-b", "GPU-c"
MIB: Final = 1024 * 1024
WAIT_S: Final = 60.0  # bounds a hang on a loaded machine; never a speed check
# What a llama-server on one GPU prints with -lv 4 (a re-reserved compute buffer counts once).
CUDA_LINES: Final = (
    "load_tensors:        CUDA0 model buffer size =   100.00 MiB",
    "llama_kv_cache:      CUDA0 KV buffer size =     8.00 MiB",
    "sched_reserve:      CUDA0 compute buffer size =    30.00 MiB",
    "sched_reserve:      CUDA0 compute buffer size =    20.00 MiB",
    "load_tensors:   CPU_Mapped model buffer size =    12.00 MiB",
)


def test_sums_per_gpu_map_cuda_indices_through_each_instances_own_order() -> None:
    reported = {"split": parse_memory(["x: CUDA0 model buffer size = 10.00 MiB",
                                       "x: CUDA1 model buffer size = 30.00 MiB",
                                       "x: CPU model buffer size = 99.00 MiB"]),
                "solo": parse_memory(["x: CUDA0 KV buffer size = 5.00 MiB"])}
    # split sees C as CUDA0 and A as CUDA1; solo sees A as its CUDA0
    placed = {"split": [C, A], "solo": [A]}
    estimates = {"split": {C: 11.0, A: 29.0}}  # solo's estimate is not known (yet)
    assert gpu_memory([A, B, C], placed, estimates, reported) == {
        A: GpuMemory(("solo", "split"), 29.0, 35.0),
        B: GpuMemory((), 0.0, 0.0),
        C: GpuMemory(("split",), 11.0, 10.0),
    }
    # nothing reported yet (still loading, or no -lv 4): unknown, not 0
    assert gpu_memory([A], {"solo": [A]}, {}, {}) == {A: GpuMemory(("solo",), None, None)}


def write_config(tmp_path: Path, llama: Path, model: Path) -> Path:
    fast = {"restart": {"backoff_initial_s": 0.05}, "health": {"interval_s": 0.05},
            "stop_timeout_s": 5}
    say = [arg for line in CUDA_LINES for arg in ("--say", line)]
    path = tmp_path / "node-agent.toml"
    path.write_text(tomli_w.dumps({
        "agent": {"api_listen": "127.0.0.1:0", "state_file": str(tmp_path / "state.toml")},
        "power": {"enabled": False},
        "pstate": {"enabled": False},
        "instances": {
            # CUDA order is PCI bus order: [0] is bus 0x01, [1] bus 0x41, bus 0x81 is free
            "toy": {"command": toy_command(free_port(), *say), "gpus": [0], **fast},
            "llm": {"binary": str(llama), "model": str(model), "port": free_port(),
                    "args": ["-c", "256", "-np", "1", "-t", "1", "--no-warmup"], "gpus": [1],
                    **fast},
        }}))
    return path


@pytest.mark.llama
async def test_each_gpu_shows_its_estimate_its_report_or_that_it_is_empty(
        nursery: trio.Nursery, tmp_path: Path, llama_server_bin: Path, tiny_model: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    from inference_node.cli import main

    rig = three_gpu_rig()

    def components(agent: Agent) -> list[Component]:  # the real parts on a fake GPU rig
        return build_parts(agent, inventory=FakeNvml(rig), backend=RecordingBackend(rig),
                           watch_system=False).components()

    cfg = write_config(tmp_path, llama_server_bin, tiny_model)
    agent: Agent = await nursery.start(functools.partial(
        run_agent, cfg, handle_signals=False, make_components=components))
    await wait_state(agent.supervisor, "toy", State.READY)
    await wait_state(agent.supervisor, "llm", State.READY)
    by_bus: dict[str, dict[str, Any]] = {}
    async with httpx.AsyncClient(base_url=agent.api_urls[0], timeout=WAIT_S) as api:
        with trio.fail_after(WAIT_S):
            while by_bus.get("0000:41:00.0", {}).get("estimated_mib") is None:
                await trio.sleep(0.02)  # the estimate is made once the instance runs
                by_bus = {g["pci_bus_id"]: g for g in (await api.get("/v1/gpus")).json()["gpus"]}
        models = {m["instance"]: m for m in (await api.get("/v1/models")).json()["models"]}
        metrics = (await api.get("/metrics")).text
    toy, llm, free = by_bus["0000:01:00.0"], by_bus["0000:41:00.0"], by_bus["0000:81:00.0"]
    assert toy["instances"] == ["toy"] and not toy["empty"]
    assert toy["reported_mib"] == 128.0  # 100 + 8 + 20: CUDA0 of its own order, CPU left out
    assert toy["estimated_mib"] is None  # a command without --model has no estimate
    assert llm["instances"] == ["llm"] and not llm["empty"]
    assert llm["estimated_mib"] == round(models["llm"]["estimated_mib"][llm["uuid"]], 1) > 0
    assert llm["reported_mib"] is None  # a CPU build reports no CUDA buffers
    assert free["instances"] == [] and free["empty"]
    assert free["estimated_mib"] == 0.0 and free["reported_mib"] == 0.0

    def sample(name: str, gpu: dict[str, Any]) -> str:
        return next(line for line in metrics.splitlines()
                    if line.startswith(name + "{") and f'uuid="{gpu["uuid"]}"' in line)

    assert sample("llamanap_gpu_empty", free).endswith(" 1.0")
    assert sample("llamanap_gpu_empty", toy).endswith(" 0.0")
    assert float(sample("llamanap_gpu_memory_reported_bytes", toy).split()[-1]) == 128 * MIB
    assert float(sample("llamanap_gpu_memory_estimated_bytes", llm).split()[-1]) == \
        pytest.approx(llm["estimated_mib"] * MIB)
    assert not any(line.startswith("llamanap_gpu_memory_estimated_bytes{")
                   and toy["uuid"] in line for line in metrics.splitlines())  # unknown: no 0

    code = await trio.to_thread.run_sync(main, ["status", "--url", agent.api_urls[0]])
    out = capsys.readouterr().out
    assert code == 0
    rows = {line.split()[1]: line for line in out.splitlines()
            if line.split()[1:2] and line.split()[1].startswith("0000:")}
    assert rows["0000:81:00.0"].rstrip().endswith("empty")
    assert "0/0" in rows["0000:81:00.0"] and "-/128" in rows["0000:01:00.0"]
    agent.request_shutdown()
