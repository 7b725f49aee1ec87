"""Repacked host weights and an instance's MiB per device from its llama-server flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from inference_node.placement.estimate import DeviceSpec, estimate
from inference_node.placement.footprint import HOST_PROCESS_MIB, instance_footprint
from inference_node.placement.ggml_sizes import mib
from inference_node.placement.gguf_info import read_model
from inference_node.placement.repack import NO_REPACK, CpuFeatures, is_repacked
from inference_node.placement.settings import LaunchSettings
from shared.tiny_gguf import TinyModelSpec, write_tiny_model

Q4 = TinyModelSpec(n_layer=4, n_embd=256, n_ff=768, n_head=4, n_head_kv=2, n_ctx_train=4096,
                   tensor_type="Q4_0")
AVX2 = CpuFeatures(avx2=True)


@pytest.fixture(scope="module")
def q4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("q4") / "q4.gguf", Q4)


def test_repack_rules() -> None:
    model_rows = 256
    from inference_node.placement.gguf_info import TensorInfo
    q4 = TensorInfo("blk.0.attn_q.weight", "Q4_0", (256, model_rows), 1)
    odd = TensorInfo("output.weight", "Q4_0", (256, 262), 1)
    embd = TensorInfo("token_embd.weight", "Q4_0", (256, 256), 1)
    q8 = TensorInfo("blk.0.attn_q.weight", "Q8_0", (256, 256), 1)
    assert is_repacked(q4, AVX2) and not is_repacked(q4, NO_REPACK)
    assert not is_repacked(odd, AVX2)  # 262 rows: not a multiple of 8
    assert is_repacked(odd.__class__("o", "Q4_0", (256, 260), 1), CpuFeatures(dotprod=True))
    assert not is_repacked(embd, AVX2)  # looked up, not multiplied
    assert not is_repacked(q8, AVX2)


def test_repacked_weights_leave_the_mapping(q4: Path) -> None:
    model = read_model(q4)
    s = LaunchSettings(ctx=4096)
    plain = estimate(model, s, [], NO_REPACK).host.weights
    packed = estimate(model, s, [], AVX2).host.weights
    # every layer matrix is repacked (a copy of its own); the mapping shrinks to the span
    # from token_embd to the last norm, which still covers the repacked ones in between
    matrices = sum(t.n_bytes for il in range(model.n_layer) for t in model.layer_tensors(il)
                   if len(t.shape) == 2)
    assert packed > plain
    assert packed - plain < matrices
    assert estimate(model, s.with_(repack=False), [], AVX2).host.weights == plain


def test_footprint_adds_process_overhead_per_device(q4: Path) -> None:
    model = read_model(q4)
    argv = ["-c", "2048", "-np", "2", "-ngl", "99", "-ts", "1,3", "-fa", "off"]
    fp = instance_footprint(model, argv, [DeviceSpec("GPU-a"), DeviceSpec("GPU-b")],
                            process_mib=300, cpu=NO_REPACK)
    est = fp.estimate
    assert [n for n, _ in fp.devices] == ["GPU-a", "GPU-b"]
    assert fp.device_mib["GPU-b"] == pytest.approx(mib(est.devices[1].total) + 300)
    assert fp.host_mib == pytest.approx(mib(est.host.total) + HOST_PROCESS_MIB)
    assert est.n_ctx == 2048 and len(est.devices[1].layers) > len(est.devices[0].layers)


def test_footprint_on_a_cpu_only_host_keeps_every_layer_there(q4: Path) -> None:
    fp = instance_footprint(read_model(q4), ["-c", "1024"], [], cpu=NO_REPACK)
    assert fp.devices == ()
    assert fp.estimate.host.layers == list(range(Q4.n_layer + 1))
    assert fp.total_mib == fp.host_mib
