"""The estimate against the real llama-server: the MiB it reports per device, per component.

Weights and KV must equal what llama-server prints (it prints two decimals); the compute
buffer, which has no formula, must be within the documented tolerance.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from inference_node.placement.args import settings_from_args
from inference_node.placement.estimate import DeviceEstimate, DeviceSpec, estimate
from inference_node.placement.ggml_sizes import mib
from inference_node.placement.gguf_info import read_model
from inference_node.placement.measured import MeasuredDevice, parse_memory
from shared.llama_bin import find_rpc_server
from shared.tiny_gguf import PRESETS, TinyModelSpec, write_tiny_model
from tests.support.llama import llama_server, rpc_servers

pytestmark = pytest.mark.llama

DATA = Path(__file__).parent / "data"
PRINT_ROUNDING_MIB = 0.006  # llama-server prints MiB with two decimals
COMPUTE_TOLERANCE = 0.15
COMPUTE_SLACK_MIB = 32.0
BASE_ARGS = ("-lv", "4", "-t", "1", "--no-warmup")


def assert_matches(est: DeviceEstimate, got: MeasuredDevice) -> None:
    assert abs(mib(est.weights) - got.model) <= PRINT_ROUNDING_MIB, (mib(est.weights), got)
    # sliding-window models print two KV buffers, each rounded
    assert abs(mib(est.kv) - got.kv) <= 2 * PRINT_ROUNDING_MIB, (mib(est.kv), got)
    gap = abs(mib(est.compute) - got.compute)
    assert gap <= max(COMPUTE_TOLERANCE * got.compute, COMPUTE_SLACK_MIB), (mib(est.compute), got)


TIED_32 = TinyModelSpec(n_embd=128, n_head=4, tied_embeddings=True)  # head size 32 takes q8_0
SHAPES = {**PRESETS, "tied-32": TIED_32}


@pytest.mark.parametrize(
    ("preset", "flags"),
    [
        ("llama-gqa", ("-c", "4096")),
        ("tied-32", ("-c", "8192", "-np", "2", "-ctk", "q8_0", "-ctv", "q8_0", "-fa", "on")),
        ("gemma2-swa", ("-c", "4096", "-np", "3")),
        ("qwen2-bias", ("-c", "4096", "-fa", "off")),
        ("llama-moe", ("-c", "2048", "-ub", "256")),
    ],
)
async def test_host_estimate_matches_llama_server(llama_server_bin: Path, tmp_path: Path,
                                                  preset: str, flags: tuple[str, ...]) -> None:
    path = write_tiny_model(tmp_path / f"{preset}.gguf", SHAPES[preset])
    async with llama_server(llama_server_bin, path, (*BASE_ARGS, *flags)) as server:
        got = parse_memory(server.log.lines)
    est = estimate(read_model(path), settings_from_args(flags), [])
    assert_matches(est.host, got.host)


async def test_two_rpc_devices_split_as_planned(llama_server_bin: Path, tmp_path: Path) -> None:
    spec = TinyModelSpec(n_layer=6, n_embd=128, n_ff=256, n_head=8, n_head_kv=2)
    path = write_tiny_model(tmp_path / "split.gguf", spec)
    flags = ("-c", "4096", "-ngl", "99", "-ts", "1,2")
    async with rpc_servers(find_rpc_server(), 2) as endpoints:
        rpc = [ep for ep, _ in endpoints]
        async with llama_server(llama_server_bin, path,
                                (*BASE_ARGS, *flags, "--rpc", ",".join(rpc))) as server:
            got = parse_memory(server.log.lines)
    est = estimate(read_model(path), settings_from_args(flags),
                   [DeviceSpec("RPC0", "rpc"), DeviceSpec("RPC1", "rpc")])
    # 7 layers over 1:2: layers 0-2 on the first device, 3-5 and the output on the second
    assert est.devices[0].layers == [0, 1, 2]
    assert est.devices[1].layers == [3, 4, 5, 6]
    for ep, dev in zip(rpc, est.devices, strict=True):
        assert_matches(dev, got.devices[f"RPC0[{ep}]"])


async def test_llama_fit_params_agrees_per_device(tmp_path: Path) -> None:
    """llama.cpp's own dry run over two RPC devices gives our weights and KV per device."""
    import trio

    from inference_node.placement.args import settings_to_args
    from inference_node.placement.fit_check import run_fit_params
    from shared.llama_bin import find_tool

    spec = TinyModelSpec(n_layer=8, n_embd=256, n_ff=512, n_head=8, n_head_kv=2)
    path = write_tiny_model(tmp_path / "fit.gguf", spec)
    s = settings_from_args(["-c", "8192", "-np", "1", "-ngl", "99", "-ts", "1,3"])
    est = estimate(read_model(path), s, [DeviceSpec("RPC0", "rpc"), DeviceSpec("RPC1", "rpc")])
    async with rpc_servers(find_rpc_server(), 2) as endpoints:
        flags = [*settings_to_args(s, unified_flag=False), "--rpc",
                 ",".join(ep for ep, _ in endpoints)]
        lines = await trio.to_thread.run_sync(run_fit_params, find_tool("llama-fit-params"),
                                              path, flags)
    assert [x.device for x in lines] == ["RPC0", "RPC1", "Host"]
    for x, dev in zip(lines, est.devices, strict=False):
        # llama-fit-params truncates to whole MiB
        assert x.model_mib == int(mib(dev.weights)) and x.context_mib == int(mib(dev.kv))


@pytest.mark.parametrize(
    "flags",
    [
        ("-ngl", "99", "-ts", "3,1,2"),
        ("-ngl", "5", "-ts", "1,1,1"),
        ("-ngl", "8", "-ts", "2,5,1"),  # -ngl == n_layer: layer 0 stays, the output goes
        ("-ngl", "99", "-ts", "1,0,1"),
    ],
)
async def test_layer_rule_matches_llama_cpp(llama_server_bin: Path, tmp_path: Path,
                                            flags: tuple[str, ...]) -> None:
    """llama.cpp logs each layer's device at -lv 5; the rule must give the same map."""
    import re

    from inference_node.placement.estimate import HOST, layer_devices

    spec = TinyModelSpec(n_layer=8)
    path = write_tiny_model(tmp_path / "rule.gguf", spec)
    async with rpc_servers(find_rpc_server(), 3) as endpoints:
        rpc = ",".join(ep for ep, _ in endpoints)
        args = ("-lv", "5", "-t", "1", "--no-warmup", "-c", "512", *flags, "--rpc", rpc)
        async with llama_server(llama_server_bin, path, args) as server:
            lines = server.log.matching("assigned to device")
    seen: dict[int, int] = {}
    for line in lines:
        m = re.search(r"layer\s+(\d+) assigned to device (\w+)", line)
        assert m, line
        name = m.group(2)
        seen[int(m.group(1))] = HOST if name == "CPU" else int(name.removeprefix("RPC"))
    s = settings_from_args(flags)
    expected = layer_devices(spec.n_layer, 3, s.n_gpu_layers, s.tensor_split)
    assert [seen[il] for il in range(spec.n_layer + 1)] == expected


def test_parse_memory_of_captured_logs() -> None:
    cpu = parse_memory((DATA / "llama_server_lv4.log").read_text().splitlines())
    assert cpu.gpu_names() == []
    assert (cpu.host.model, cpu.host.kv, cpu.host.compute) == (0.66, 0.38, 1.90)
    rpc = parse_memory((DATA / "llama_server_rpc_lv4.log").read_text().splitlines())
    assert sorted(rpc.gpu_names()) == ["RPC0[127.0.0.1:33305]", "RPC0[127.0.0.1:45449]"]
    first = rpc.devices["RPC0[127.0.0.1:33305]"]
    assert (first.model, first.kv, first.compute) == (0.33, 0.19, 3.55)
    assert rpc.host.model == 0.06 and rpc.host.compute == 3.33


Q4 = TinyModelSpec(n_layer=4, n_embd=256, n_ff=768, n_head=4, n_head_kv=2, tensor_type="Q4_0")


@pytest.mark.parametrize("flags", [("-c", "4096"), ("-c", "4096", "--no-repack")])
async def test_repacked_q4_weights_match_llama_server(llama_server_bin: Path, tmp_path: Path,
                                                      flags: tuple[str, ...]) -> None:
    # On this CPU (AVX2 or Arm dot product) llama.cpp copies Q4_0 matrices into CPU_REPACK
    # and maps only the rest; --no-repack maps everything.
    path = write_tiny_model(tmp_path / "q4.gguf", Q4)
    async with llama_server(llama_server_bin, path, (*BASE_ARGS, *flags)) as server:
        got = parse_memory(server.log.lines)
        repacked = any("CPU_REPACK model buffer" in line for line in server.log.lines)
    assert repacked == ("--no-repack" not in flags)
    est = estimate(read_model(path), settings_from_args(flags), [])
    assert_matches(est.host, got.host)


async def test_partial_offload_repacks_the_host_share(llama_server_bin: Path,
                                                      tmp_path: Path) -> None:
    path = write_tiny_model(tmp_path / "q4.gguf", Q4)
    flags = ("-c", "4096", "-ngl", "2")
    async with rpc_servers(find_rpc_server(), 1) as endpoints, \
            llama_server(llama_server_bin, path,
                         (*BASE_ARGS, *flags, "--rpc", ",".join(e for e, _ in endpoints))
                         ) as server:
        got = parse_memory(server.log.lines)
    est = estimate(read_model(path), settings_from_args(flags), [DeviceSpec("RPC0", "rpc")])
    # the host's weights are two printed buffers (CPU_Mapped, CPU_REPACK), each rounded
    assert abs(mib(est.host.weights) - got.host.model) <= 2 * PRINT_ROUNDING_MIB
    assert abs(mib(est.host.kv) - got.host.kv) <= PRINT_ROUNDING_MIB
    (name,) = got.gpu_names()
    # the device's share: within the 1% target (its buffer rounds up by a few KiB)
    dev, measured = est.devices[0], got.devices[name]
    assert mib(dev.weights) == pytest.approx(measured.model, rel=0.01)
    assert mib(dev.kv) == pytest.approx(measured.kv, rel=0.01)


async def test_pipeline_compute_without_flash_attention_at_a_long_context(
        llama_server_bin: Path, tmp_path: Path) -> None:
    # Without flash attention the per-copy input that grows with the cache stops growing at
    # 8 ubatches of cells: at -c 8192 -ub 256 an uncapped estimate is ~30% high on the host.
    spec = TinyModelSpec(n_layer=8, n_embd=512, n_ff=1536, n_head=8, n_ctx_train=32768,
                         tensor_type="F16")  # 512 KV values per cell: the input is large
    path = write_tiny_model(tmp_path / "m.gguf", spec)
    flags = ("-c", "8192", "-np", "2", "-ub", "256", "-ngl", "99", "-ts", "1,1", "-fa", "off")
    async with rpc_servers(find_rpc_server(), 2) as endpoints, \
            llama_server(llama_server_bin, path,
                         (*BASE_ARGS, *flags, "--rpc", ",".join(e for e, _ in endpoints))
                         ) as server:
        got = parse_memory(server.log.lines)
    est = estimate(read_model(path), settings_from_args(flags),
                   [DeviceSpec("RPC0", "rpc"), DeviceSpec("RPC1", "rpc")])
    names = got.gpu_names()
    pairs = [(est.host, got.host), *((est.devices[i], got.devices[names[i]]) for i in range(2))]
    for mine, theirs in pairs:
        assert mib(mine.compute) == pytest.approx(theirs.compute, rel=COMPUTE_TOLERANCE)


# A layer width where one n_embd of activations is ~7% of the device's compute buffer.
WIDE_FFN = TinyModelSpec(n_layer=8, n_embd=512, n_ff=1536, n_head=8, n_ctx_train=32768,
                         tensor_type="F16")
TIGHT_COMPUTE = 0.03


@pytest.mark.parametrize("flags", [("-c", "4096", "-ngl", "3"),
                                   ("-c", "4096", "-ngl", "5", "-ub", "256"),
                                   # a quantized cache's rotated Q and K fill that gap again
                                   ("-c", "4096", "-ngl", "3", "-ctk", "q8_0"),
                                   # ... but rotating K and V both leaves it open
                                   ("-c", "4096", "-ngl", "3", "-ctk", "q8_0", "-ctv", "q8_0"),
                                   # attention on the host: the device is fed every layer
                                   ("-c", "4096", "-ngl", "3", "-nkvo")])
async def test_partial_offload_device_compute(llama_server_bin: Path, tmp_path: Path,
                                              flags: tuple[str, ...]) -> None:
    # The device's first layer input comes from the host (the residual add moves over in two
    # halves): its feed-forward peak is one n_embd below a device that holds layer 0, which a
    # full-offload formula overestimates by ~7% here.
    path = write_tiny_model(tmp_path / "m.gguf", WIDE_FFN)
    async with rpc_servers(find_rpc_server(), 1) as endpoints, \
            llama_server(llama_server_bin, path,
                         (*BASE_ARGS, *flags, "--rpc", ",".join(e for e, _ in endpoints))
                         ) as server:
        got = parse_memory(server.log.lines)
    est = estimate(read_model(path), settings_from_args(flags), [DeviceSpec("RPC0", "rpc")])
    (name,) = got.gpu_names()
    assert mib(est.devices[0].compute) == pytest.approx(got.devices[name].compute,
                                                        rel=TIGHT_COMPUTE)


SWA = TinyModelSpec(family="gemma2", n_layer=8, n_embd=512, n_ff=1024, n_head=8, n_head_kv=4,
                    sliding_window=256, tied_embeddings=True, n_ctx_train=32768,
                    tensor_type="F16")


async def test_device_with_one_kind_of_swa_layer_gets_one_cache_input(
        llama_server_bin: Path, tmp_path: Path) -> None:
    # Without flash attention each KV cache (full, windowed) feeds its own cache-sized input;
    # the device holding only gemma2's last (full) layer gets one of the two: counting both
    # is ~4% high here.
    path = write_tiny_model(tmp_path / "swa.gguf", SWA)
    flags = ("-c", "4096", "-np", "2", "-ngl", "2", "-fa", "off")
    async with rpc_servers(find_rpc_server(), 1) as endpoints, \
            llama_server(llama_server_bin, path,
                         (*BASE_ARGS, *flags, "--rpc", ",".join(e for e, _ in endpoints))
                         ) as server:
        got = parse_memory(server.log.lines)
    est = estimate(read_model(path), settings_from_args(flags), [DeviceSpec("RPC0", "rpc")])
    (name,) = got.gpu_names()
    assert est.devices[0].layers == [7, 8]
    assert mib(est.devices[0].compute) == pytest.approx(got.devices[name].compute,
                                                        rel=TIGHT_COMPUTE)


TOTAL_TOLERANCE = 0.03


async def test_rotated_cache_on_a_post_norm_model_across_two_devices(
        llama_server_bin: Path, tmp_path: Path) -> None:
    # A q8_0 K cache makes llama.cpp rotate Q and K; on gemma2 (post-norms) the rotated
    # copies' holes take the relayed device's feed-forward one n_embd lower still, where
    # a dense llama measures one higher: modeled as dense, RPC0's total was 5% high.
    path = write_tiny_model(tmp_path / "swa.gguf", SWA)
    flags = ("-c", "8192", "-ngl", "5", "-ts", "1,1", "-ctk", "q8_0")
    async with rpc_servers(find_rpc_server(), 2) as endpoints:
        rpc = [ep for ep, _ in endpoints]
        async with llama_server(llama_server_bin, path,
                                (*BASE_ARGS, *flags, "--rpc", ",".join(rpc))) as server:
            got = parse_memory(server.log.lines)
    est = estimate(read_model(path), settings_from_args(flags),
                   [DeviceSpec("RPC0", "rpc"), DeviceSpec("RPC1", "rpc")])
    # every RPC device prints as RPC0[endpoint]
    theirs = [got.devices[f"RPC0[{ep}]"] for ep in rpc]
    assert est.devices[0].layers == [4, 5, 6]
    for mine, measured in zip(est.devices, theirs, strict=True):
        assert_matches(mine, measured)
        assert mib(mine.total) == pytest.approx(measured.total, rel=TOTAL_TOLERANCE)
    assert mib(est.devices[0].compute) == pytest.approx(theirs[0].compute, rel=TIGHT_COMPUTE)
