"""placement.autoplace: configured instances to plans, and the supervisor's launch planner."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from inference_node.errors import PlacementError
from inference_node.gpu.inventory import GpuInfo, NoGpus
from inference_node.placement.autoplace import (
    RESERVATION_S,
    AutoPlacer,
    gpus_from_inventory,
    plan_config,
    request_for,
)
from inference_node.placement.estimate import DeviceSpec, estimate
from inference_node.placement.measured import parse_memory
from inference_node.placement.planner import GpuFree, InstanceRequest, plan_instances
from inference_node.supervisor.launch import build_launch
from shared.config.node import load_node_config
from shared.llama_bin import find_rpc_server
from shared.tiny_gguf import TinyModelSpec, write_tiny_model
from tests.support.llama import llama_server, rpc_servers

MIB = 2**20
SPEC = TinyModelSpec(n_layer=6, n_embd=128, n_ff=256, n_head=8, n_head_kv=2, n_ctx_train=8192)
WIDE = TinyModelSpec(n_layer=8, n_embd=512, n_ff=2048, n_head=8, n_head_kv=2, n_ctx_train=8192)


class FixedInventory:
    """Test stand-in for NVML: the GPUs given, as they are."""

    def __init__(self, gpus: list[GpuInfo]) -> None:
        self.gpus = gpus

    @property
    def problem(self) -> str | None:
        return None

    def snapshot(self) -> list[GpuInfo]:
        return list(self.gpus)

    def performance_state(self, uuid: str) -> int | None:
        return None


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return write_tiny_model(tmp_path / "tiny.gguf", SPEC)


def write_config(tmp_path: Path, model: Path, extra: str = "") -> Path:
    path = tmp_path / "node.toml"
    path.write_text(textwrap.dedent(f"""
        [agent]
        state_file = "{tmp_path / 'state.toml'}"

        [placement]
        safety_margin_mib = 0

        [instances.a]
        model = "{model}"
        port = 18080
        args = ["-c", "4096", "-np", "2"]
        gpus = "auto"

        [instances.b]
        command = "llama-server --model {model} --port 18081 -c 2048"
        gpus = "auto"
        allow_partial_offload = true

        [instances.fixed]
        model = "{model}"
        port = 18082
        gpus = [0]
        {extra}
    """))
    return path


def test_config_accepts_auto_and_requests_read_both_forms(tmp_path: Path, model: Path) -> None:
    cfg = load_node_config(write_config(tmp_path, model))
    a = request_for("a", cfg.instances["a"])
    assert (a.settings.ctx, a.settings.parallel) == (4096, 2)
    b = request_for("b", cfg.instances["b"])
    assert b.settings.ctx == 2048 and b.allow_partial_offload
    assert b.model.n_layer == SPEC.n_layer


def test_plan_config_places_only_auto_instances(tmp_path: Path, model: Path) -> None:
    cfg = load_node_config(write_config(tmp_path, model))
    result = plan_config(cfg, [GpuFree("GPU-a", "g", 0, 1000, 1000),
                               GpuFree("GPU-b", "g", 1, 1000, 1000)], process_mib=0)
    assert set(result.plans) == {"a", "b"} and not result.refusals
    # both small instances share one GPU; the other stays empty
    assert result.plans["a"].uuids == result.plans["b"].uuids


def test_gpus_from_inventory() -> None:
    info = GpuInfo(index=1, uuid="GPU-x", pci_bus_id="0000:02:00.0", name="P40",
                   memory_total_mib=24576.0, memory_free_mib=20000.0)
    assert gpus_from_inventory([info]) == [GpuFree("GPU-x", "P40", 1, 20000.0, 24576.0)]
    blind = GpuInfo(index=0, uuid="GPU-y", pci_bus_id="0000:01:00.0", name="?")
    assert gpus_from_inventory([blind])[0].free_mib == 0.0


async def test_placer_leaves_fixed_instances_alone(tmp_path: Path, model: Path) -> None:
    cfg = load_node_config(write_config(tmp_path, model))
    placer = AutoPlacer(NoGpus("no driver"), margin_mib=0)
    assert await placer("fixed", cfg.instances["fixed"]) is None


async def test_placer_on_a_cpu_only_box_runs_on_the_host(tmp_path: Path, model: Path) -> None:
    cfg = load_node_config(write_config(tmp_path, model))
    placer = AutoPlacer(NoGpus("no driver"), margin_mib=0)
    overrides = await placer("a", cfg.instances["a"])
    assert overrides is not None and overrides.gpus == ()
    spec = build_launch("a", cfg.instances["a"], overrides, base_env={})
    assert spec.argv[-4:] == ("-ngl", "0", "-c", "4096")
    assert spec.env["CUDA_VISIBLE_DEVICES"] == ""


def test_reservations_keep_two_starts_from_taking_the_same_memory(model: Path) -> None:
    from inference_node.placement.gguf_info import read_model
    from inference_node.placement.settings import LaunchSettings

    info = read_model(model)
    s = LaunchSettings(ctx=4096)
    need = estimate(info, s, [DeviceSpec("g")]).total / MIB
    gpus = [GpuFree("GPU-a", "g", 0, need * 1.5, need * 1.5),
            GpuFree("GPU-b", "g", 1, need * 1.5, need * 1.5)]
    placer = AutoPlacer(FixedInventory([]), margin_mib=0, process_mib=0)
    first = placer.decide(InstanceRequest("one", info, s), gpus, now=0.0)
    # NVML still shows both GPUs free: the reservation sends the second start elsewhere
    second = placer.decide(InstanceRequest("two", info, s), gpus, now=1.0)
    assert first.gpus != second.gpus
    # once the reservation is old, NVML's numbers are trusted again
    third = placer.decide(InstanceRequest("three", info, s), gpus, now=2 * RESERVATION_S)
    assert third.gpus == first.gpus or third.gpus == second.gpus
    with pytest.raises(PlacementError, match="instance big: needs"):
        placer.decide(InstanceRequest("big", info, s), [GpuFree("GPU-c", "g", 2, 1, 1)], now=3.0)


@pytest.mark.llama
async def test_planned_flags_give_the_planned_split_in_llama_server(
        llama_server_bin: Path, model: Path) -> None:
    """Plan for two 'GPUs' of limited memory, launch llama-server with the plan's flags on
    two RPC devices standing in for them, and read back what each device got."""
    from inference_node.placement.gguf_info import read_model
    from inference_node.placement.settings import LaunchSettings

    # weights large next to the compute buffer, so that splitting pays off
    model = write_tiny_model(model.with_name("wide.gguf"), WIDE)
    info = read_model(model)
    s = LaunchSettings(ctx=2048)
    need = estimate(info, s, [DeviceSpec("g", "rpc")]).total / MIB
    gpus = [GpuFree("GPU-a", "rpc", 0, need * 0.7, need), GpuFree("GPU-b", "rpc", 1, need * 0.7, need)]
    result = plan_instances([InstanceRequest("m", info, s)], gpus, margin_mib=0, process_mib=0)
    plan = result.plans["m"]
    assert plan.uuids == ["GPU-a", "GPU-b"]
    async with rpc_servers(find_rpc_server(), 2) as endpoints:
        rpc = [ep for ep, _ in endpoints]
        args = ("-lv", "4", "-t", "1", "--no-warmup", *plan.launch_args(), "--rpc", ",".join(rpc))
        async with llama_server(llama_server_bin, model, args) as server:
            got = parse_memory(server.log.lines)
    for ep, g, dev in zip(rpc, plan.gpus, plan.estimate.devices, strict=True):
        measured = got.devices[f"RPC0[{ep}]"]
        assert abs(measured.model - dev.weights / MIB) < 0.01
        assert abs(measured.kv - dev.kv / MIB) < 0.01
        assert measured.total <= g.free_mib + 32  # the compute estimate's stated slack


@pytest.mark.llama
async def test_single_gpu_flags_are_accepted_and_override_the_instance(
        llama_server_bin: Path, model: Path) -> None:
    """One 'GPU' (an RPC device): the plan's flags follow the instance's own split flags,
    and llama-server ends up with the plan's layout."""
    from inference_node.placement.args import apply_plan, settings_from_args
    from inference_node.placement.gguf_info import read_model

    own = ["-c", "2048", "-ts", "3,1", "-ngl", "2"]
    info = read_model(model)
    req = InstanceRequest("m", info, settings_from_args(own))
    plan = plan_instances([req], [GpuFree("GPU-a", "rpc", 0, 1024, 1024)],
                          margin_mib=0).plans["m"]
    assert plan.launch_args()[-6:] == ["-sm", "layer", "-mg", "0", "-ts", "1"]
    async with rpc_servers(find_rpc_server(), 1) as endpoints:
        args = ("-lv", "4", "-t", "1", "--no-warmup", *own, *plan.launch_args(),
                "--rpc", endpoints[0][0])
        async with llama_server(llama_server_bin, model, args) as server:
            got = parse_memory(server.log.lines)
    device = got.devices[f"RPC0[{endpoints[0][0]}]"]
    assert abs(device.model - plan.estimate.devices[0].weights / MIB) < 0.01
    assert abs(device.kv - plan.estimate.devices[0].kv / MIB) < 0.01
    # apply_plan gives the same argv without the instance's own copies
    assert apply_plan(own, plan.args()) == ["-ngl", str(SPEC.n_layer + 1), "-c", "2048"]
    assert apply_plan(["--ctx-size=512", "--port", "9", "-ngl", "1"], ["-c", "64"]) == \
        ["--port", "9", "-c", "64"]
