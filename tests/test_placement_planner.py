"""placement.planner: packing decisions over GPU inventories, and every refusal message.

The model is an 8B-like shape built from its tensor table (32 layers of 200 MiB, 128k vocab,
GQA), so the numbers are the size of real decisions; the GPUs are the planner's own input
type, filled with free/total memory as NVML would report it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from inference_node.placement.estimate import layer_devices
from inference_node.placement.ggml_sizes import MIB
from inference_node.placement.gguf_info import ModelInfo, TensorInfo
from inference_node.placement.planner import (
    PROCESS_MIB,
    GpuFree,
    InstancePlan,
    InstanceRequest,
    PlacementResult,
    plan_instances,
)
from inference_node.placement.settings import LaunchSettings

GIB = 1024  # in MiB
N_LAYER = 32


def model_8b(layer_mib: int = 200, name: str = "m8b") -> ModelInfo:
    e, vocab = 4096, 128256
    tensors = [TensorInfo("token_embd.weight", "Q4_K", (e, vocab), 280 * MIB),
               TensorInfo("output.weight", "Q6_K", (e, vocab), 400 * MIB),
               TensorInfo("output_norm.weight", "F32", (e,), e * 4)]
    for il in range(N_LAYER):
        tensors.append(TensorInfo(f"blk.{il}.ffn_up.weight", "Q4_K", (e, 14336), layer_mib * MIB))
    return ModelInfo(
        path=Path(f"/models/{name}.gguf"), files=(Path(f"/models/{name}.gguf"),),
        architecture="llama", name=name, file_type=15, n_layer=N_LAYER, n_embd=e, n_ff=14336,
        n_ff_expert=14336, n_head=(32,) * N_LAYER, n_head_kv=(8,) * N_LAYER, head_dim_k=128,
        head_dim_v=128, head_dim_k_swa=128, head_dim_v_swa=128, n_ctx_train=131072,
        n_vocab=vocab, n_expert=0, n_expert_used=0, sliding_window=0,
        swa_layers=(False,) * N_LAYER, swa_pattern_known=True, tensors=tuple(tensors))


def gpu(index: int, total_gib: float, used_gib: float = 0.0) -> GpuFree:
    total = total_gib * GIB
    return GpuFree(f"GPU-{index:04d}", f"gpu{index}", index, total - used_gib * GIB, total)


def req(name: str = "m", ctx: int | None = 8192, layer_mib: int = 200, partial: bool = False,
        **settings: object) -> InstanceRequest:
    return InstanceRequest(name, model_8b(layer_mib, name), LaunchSettings(ctx=ctx, **settings),  # type: ignore[arg-type]
                           partial)


def only(result: PlacementResult, name: str = "m") -> InstancePlan:
    assert name in result.plans, result.refusals
    return result.plans[name]


def test_one_gpu_when_it_fits() -> None:
    plan = only(plan_instances([req()], [gpu(0, 24)], margin_mib=512))
    assert plan.uuids == ["GPU-0000"]
    assert plan.args() == ["-ngl", "33", "-c", "8192"]
    assert plan.env() == {"CUDA_VISIBLE_DEVICES": "GPU-0000"}
    total = plan.estimate.devices[0].total / MIB
    # 32 x 200 weights + output 400 + KV 32 x 32 MiB + compute
    assert 32 * 200 + 400 + 1024 < total < 32 * 200 + 400 + 1024 + 300


def test_prefers_a_gpu_in_use_over_an_empty_one() -> None:
    gpus = [gpu(0, 24), gpu(1, 24, used_gib=6)]
    plan = only(plan_instances([req()], gpus, margin_mib=512))
    assert plan.uuids == ["GPU-0001"]


def test_two_instances_pack_onto_one_gpu_and_leave_the_other_empty() -> None:
    gpus = [gpu(0, 48), gpu(1, 48)]
    result = plan_instances([req("a"), req("b")], gpus, margin_mib=512)
    assert only(result, "a").uuids == only(result, "b").uuids
    used = {only(result, n).uuids[0] for n in ("a", "b")}
    empty = {g.uuid for g in gpus} - used
    assert len(empty) == 1
    assert result.free_after_mib[empty.pop()] == 48 * GIB


def test_tightest_fit_among_empty_gpus() -> None:
    gpus = [gpu(0, 48), gpu(1, 12), gpu(2, 24)]
    plan = only(plan_instances([req()], gpus, margin_mib=512))
    assert plan.uuids == ["GPU-0001"]  # the 12 GiB card holds it; the big ones stay free


def test_two_gpus_with_layer_counts_that_fit() -> None:
    gpus = [gpu(0, 8), gpu(1, 8)]
    plan = only(plan_instances([req()], gpus, margin_mib=512))
    assert plan.uuids == ["GPU-0000", "GPU-0001"]
    counts = [int(x) for x in plan.settings.tensor_split]
    assert sum(counts) == N_LAYER + 1
    assert layer_devices(N_LAYER, 2, -1, plan.settings.tensor_split) == \
        [0] * counts[0] + [1] * counts[1]
    for g, d in zip(plan.gpus, plan.estimate.devices, strict=True):
        assert d.total / MIB <= g.free_mib - 512
    assert plan.args()[-4:] == ["-sm", "layer", "-ts", f"{counts[0]},{counts[1]}"]
    assert plan.env() == {"CUDA_VISIBLE_DEVICES": "GPU-0000,GPU-0001"}


def test_uneven_gpus_get_uneven_shares() -> None:
    # ~8 GiB over cards with 4, 5 and 6 GiB free: the two partly used ones
    gpus = [gpu(0, 4), gpu(1, 6, used_gib=1), gpu(2, 10, used_gib=4)]
    plan = only(plan_instances([req()], gpus, margin_mib=256))
    assert plan.uuids == ["GPU-0001", "GPU-0002"]
    first, second = (int(x) for x in plan.settings.tensor_split)
    assert first + second == N_LAYER + 1
    # the first card is filled: one more layer (200 MiB weights + 32 MiB KV) would not fit
    d0 = plan.estimate.devices[0].total / MIB
    room = 5 * GIB - 256 - PROCESS_MIB
    assert room - 232 < d0 <= room
    for g, d in zip(plan.gpus, plan.estimate.devices, strict=True):
        assert d.total / MIB <= g.free_mib - 256


def test_four_mixed_gpus_fewest_and_in_use_first() -> None:
    # 8B at 200 MiB/layer needs ~8 GiB; at 800 MiB/layer ~27 GiB, more than any one card
    gpus = [gpu(0, 8), gpu(1, 12), gpu(2, 24, used_gib=10), gpu(3, 24)]
    result = plan_instances([req("big", layer_mib=800), req("small")], gpus, margin_mib=512)
    big, small = only(result, "big"), only(result, "small")
    assert big.uuids == ["GPU-0002", "GPU-0003"]  # two cards, the partly used one among them
    # the small one packs onto a card already in use: the 8 and 12 GiB cards stay empty
    assert small.uuids[0] in ("GPU-0002", "GPU-0003")
    assert result.free_after_mib["GPU-0000"] == 8 * GIB
    assert result.free_after_mib["GPU-0001"] == 12 * GIB


def test_partial_offload_when_allowed() -> None:
    plan = only(plan_instances([req(partial=True)], [gpu(0, 6)], margin_mib=512))
    assert plan.partial
    ngl = plan.estimate.n_gpu_layers
    assert 0 < ngl < N_LAYER + 1
    assert plan.args()[:2] == ["-ngl", str(ngl)]
    assert plan.estimate.devices[0].total / MIB <= 6 * GIB - 512
    assert plan.estimate.host.weights > 0


def test_refusal_says_how_much_and_that_a_smaller_context_fits() -> None:
    result = plan_instances([req(ctx=131072)], [gpu(0, 12)], margin_mib=512)
    reason = result.refusals["m"].reason
    assert reason.startswith("instance m: needs ")
    assert "at -c 131072" in reason and "MiB short" in reason
    assert "-c " in reason.split("MiB short")[1]
    assert "allow_partial_offload = true" in reason
    assert "\n" not in reason


def test_refusal_suggests_q8_kv_cache() -> None:
    # at 16k: weights 6800 + f16 KV 2048 + compute ~144 MiB; q8_0 KV is 1088 MiB
    result = plan_instances([req(ctx=16384)], [gpu(0, 8.5)], margin_mib=0)
    reason = result.refusals["m"].reason
    assert "--cache-type-k q8_0 --cache-type-v q8_0" in reason


def test_refusal_when_nothing_fits() -> None:
    result = plan_instances([req(layer_mib=2000)], [gpu(0, 24), gpu(1, 24)], margin_mib=512)
    reason = result.refusals["m"].reason
    assert "nothing smaller fits either" in reason
    # 24 GiB less the 512 MiB margin and one process's 300 MiB, per card
    assert "the GPUs have 47528 MiB usable together (largest 23764 MiB)" in reason


def test_refusal_when_only_the_split_overhead_does_not_fit() -> None:
    # together the cards hold the model, but each would need its own compute buffer
    need_one = 8.0 * GIB
    result = plan_instances([req()], [gpu(0, need_one / 2 / GIB), gpu(1, need_one / 2 / GIB)],
                            margin_mib=0, process_mib=0)
    reason = result.refusals["m"].reason
    assert "no split fits either, as each GPU also needs its own compute buffer" in reason


def test_refusal_without_gpus() -> None:
    result = plan_instances([req()], [], margin_mib=512)
    assert "no GPU is visible" in result.refusals["m"].reason


def test_partial_offload_refused_when_not_even_one_layer_fits() -> None:
    result = plan_instances([req(partial=True)], [gpu(0, 0.25)], margin_mib=0)
    assert "m" in result.refusals
    assert "allow_partial_offload" not in result.refusals["m"].reason


@pytest.mark.parametrize("margin", [0, 1024])
def test_margin_is_kept_free(margin: int) -> None:
    plan = only(plan_instances([req()], [gpu(0, 9), gpu(1, 9)], margin_mib=margin))
    for g, d in zip(plan.gpus, plan.estimate.devices, strict=True):
        assert d.total / MIB <= g.free_mib - margin - PROCESS_MIB


def test_without_ctx_the_context_shrinks_to_fit() -> None:
    # the model's own 131072 context needs 16 GiB of KV; 12 GiB holds a smaller one
    result = plan_instances([req(ctx=None)], [gpu(0, 12)], margin_mib=512)
    plan = only(result)
    ctx = plan.settings.ctx
    assert ctx is not None and 4096 <= ctx < 131072 and ctx % 256 == 0
    assert plan.args()[2:4] == ["-c", str(ctx)]
    # one more 256-cell step would not fit (32 layers x 256 cells x 4 KiB = 32 MiB)
    assert plan.estimate.devices[0].total / MIB > 12 * GIB - 512 - PROCESS_MIB - 64
    # never below 4096: a card too small for that is a refusal
    assert "m" in plan_instances([req(ctx=None)], [gpu(0, 7.5)], margin_mib=512).refusals


def test_every_process_pays_its_own_overhead_on_a_shared_gpu() -> None:
    one = plan_instances([req("a")], [gpu(0, 48)], margin_mib=0).plans["a"]
    need = one.estimate.devices[0].total / MIB
    # room for both instances' buffers and one process overhead, but not two
    card = (2 * need + 1.5 * PROCESS_MIB) / GIB
    result = plan_instances([req("a"), req("b")], [gpu(0, card), gpu(1, 48)], margin_mib=0)
    assert only(result, "a").uuids != only(result, "b").uuids
    assert plan_instances([req("a"), req("b")], [gpu(0, card)], margin_mib=0,
                          process_mib=0).refusals == {}
