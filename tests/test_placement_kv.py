"""placement.settings and kv_cache: context padding, streams and KV bytes for each model shape.

Expected values are computed by hand from llama.cpp's rules (see the comments); the real
llama-server agrees with them in test_placement_llama.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from inference_node.errors import PlacementError
from inference_node.placement.estimate import DeviceSpec, estimate
from inference_node.placement.gguf_info import read_model
from inference_node.placement.kv_cache import attn_rotations, kv_cells, kv_total_bytes
from inference_node.placement.settings import LaunchSettings
from shared.tiny_gguf import PRESETS, TinyModelSpec, write_tiny_model

KIB = 1024
MIB = KIB * KIB


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("kv-models")
    shapes = {**PRESETS, "head-32": TinyModelSpec(n_embd=128, n_head=4)}
    return {name: write_tiny_model(folder / f"{name}.gguf", spec) for name, spec in shapes.items()}


def test_context_padding_and_streams() -> None:
    auto = LaunchSettings(ctx=4000)
    assert (auto.n_seq, auto.unified, auto.n_stream) == (4, True, 1)
    assert auto.n_ctx_seq(8192) == 4096 and auto.n_ctx(8192) == 4096
    # explicit --parallel 3: one stream per slot, each padded: 4096 // 3 = 1365 -> 1536
    per_slot = LaunchSettings(ctx=4000, parallel=3)
    assert (per_slot.unified, per_slot.n_stream) == (False, 3)
    assert per_slot.n_ctx_seq(8192) == 1536 and per_slot.n_ctx(8192) == 4608
    # --kv-unified keeps one stream with --parallel
    assert LaunchSettings(ctx=4000, parallel=3, kv_unified=True).n_ctx(8192) == 4096
    # -c 0 is the model's training context
    assert LaunchSettings(ctx=0).n_ctx(2048) == 2048
    # the batch is capped by the unpadded context
    assert LaunchSettings(ctx=300).batch_sizes(2048) == (300, 300)


@pytest.mark.parametrize(
    ("preset", "settings", "expected"),
    [
        # plain llama: 2 layers, 4 KV heads x 16 dims, f16: 128 B per cell for K and for V
        ("llama", LaunchSettings(ctx=4096), 2 * 4096 * (128 + 128)),
        # GQA: 4 layers, 2 KV heads x 8 dims = 16 values: 32 B each for K and V
        ("llama-gqa", LaunchSettings(ctx=4096), 4 * 4096 * (32 + 32)),
        # tied embeddings change nothing in the cache
        ("llama-tied", LaunchSettings(ctx=8192), 2 * 8192 * 256),
        # experts neither
        ("llama-moe", LaunchSettings(ctx=4096, parallel=2), 2 * 4096 * 256),
        # head size 32, 4 KV heads: q8_0 K is 4 blocks of 34 B; f16 V 256 B
        ("head-32", LaunchSettings(ctx=4096, cache_type_k="q8_0"), 2 * 4096 * (136 + 256)),
        # q4_0 K and V with flash attention: 4 blocks of 18 B each
        ("head-32", LaunchSettings(ctx=4096, cache_type_k="q4_0", cache_type_v="q4_0",
                                   flash_attn="on"), 2 * 4096 * (72 + 72)),
        # qwen2 with biases: 2 layers, 2 KV heads x 16 dims = 32 values: 64 B each
        ("qwen2-bias", LaunchSettings(ctx=4096), 2 * 4096 * 128),
        # gemma2: layers 0, 2 slide over a 64-token window: pad(min(4096, 64*4 + 512), 256)
        # = 768 cells; layers 1, 3 hold 4096; 2 KV heads x 16 dims: 64 B each for K and V
        ("gemma2-swa", LaunchSettings(ctx=4096), (2 * 768 + 2 * 4096) * 128),
        # per-slot streams: the window counts once per stream: pad(64 + 512) = 768 per stream,
        # 2 streams; full layers 2 x 2048
        ("gemma2-swa", LaunchSettings(ctx=4096, parallel=2), (2 * 768 * 2 + 2 * 4096) * 128),
        # --swa-full gives the sliding layers the whole context
        ("gemma2-swa", LaunchSettings(ctx=4096, swa_full=True), 4 * 4096 * 128),
    ],
)
def test_kv_bytes(models: dict[str, Path], preset: str, settings: LaunchSettings,
                  expected: int) -> None:
    assert kv_total_bytes(read_model(models[preset]), settings) == expected


def test_swa_cells_never_exceed_the_context(models: dict[str, Path]) -> None:
    m = read_model(models["gemma2-swa"])
    assert kv_cells(m, LaunchSettings(ctx=512), 0) == 512
    assert kv_cells(m, LaunchSettings(ctx=512), 1) == 512


def test_kv_follows_the_layers_across_devices(models: dict[str, Path]) -> None:
    m = read_model(models["llama-gqa"])
    s = LaunchSettings(ctx=4096, tensor_split=(1, 3))
    est = estimate(m, s, [DeviceSpec("A", "rpc"), DeviceSpec("B", "rpc")])
    per_layer = 4096 * 64
    # 5 layers (4 + output) over 1:3: layers 0, 1 on A (il/5 < 0.25 for il = 0, 1)
    assert est.devices[0].layers == [0, 1] and est.devices[0].kv == 2 * per_layer
    assert est.devices[1].layers == [2, 3, 4] and est.devices[1].kv == 2 * per_layer
    assert est.host.kv == 0
    no_offload = estimate(m, s.with_(kv_offload=False), [DeviceSpec("A"), DeviceSpec("B")])
    assert no_offload.host.kv == 4 * per_layer and no_offload.devices[0].kv == 0


def test_weights_follow_the_layers(models: dict[str, Path]) -> None:
    m = read_model(models["llama-tied"])
    est = estimate(m, LaunchSettings(ctx=2048), [DeviceSpec("A", "rpc")])
    # token_embd stays on the host and is loaded again, as the output, on the device
    embd = next(t.n_bytes for t in m.tensors if t.name == "token_embd.weight")
    assert est.host.weights == embd
    assert est.devices[0].weights == sum(m.layer_bytes) + m.output_bytes
    assert m.output_bytes > embd
    partial = estimate(m, LaunchSettings(ctx=2048, n_gpu_layers=1), [DeviceSpec("A", "rpc")])
    assert partial.devices[0].layers == [m.n_layer]  # only the output layer


def test_quantized_cache_needs_whole_blocks_per_head(models: dict[str, Path]) -> None:
    # llama.cpp refuses a q8_0 cache when blocks of 32 do not divide the head size (16 here)
    with pytest.raises(PlacementError, match="blocks of 32 do not divide this model's head size 16"):
        kv_total_bytes(read_model(models["llama"]), LaunchSettings(cache_type_k="q8_0"))


def test_cuda_pads_quantized_rows(tmp_path: Path) -> None:
    spec = TinyModelSpec(n_layer=1, n_embd=64, n_ff=128, tensor_type="Q8_0")
    m = read_model(write_tiny_model(tmp_path / "q8.gguf", spec))
    cpu = estimate(m, LaunchSettings(ctx=256), [DeviceSpec("A", "rpc")]).devices[0].weights
    cuda = estimate(m, LaunchSettings(ctx=256), [DeviceSpec("A", "cuda")]).devices[0].weights
    # every Q8_0 row of 64 (or 128) values is padded to 512 values on CUDA
    assert cuda > cpu


def test_bad_settings_are_one_line() -> None:
    with pytest.raises(PlacementError, match="--cache-type-k q9: unknown cache type"):
        LaunchSettings(cache_type_k="q9")
    with pytest.raises(PlacementError, match="needs flash attention"):
        LaunchSettings(cache_type_v="q8_0", flash_attn="off")
    with pytest.raises(PlacementError, match="--parallel 0"):
        LaunchSettings(parallel=0)


def test_row_split_cuts_matrices_across_devices(models: dict[str, Path]) -> None:
    m = read_model(models["llama-gqa"])
    layer = estimate(m, LaunchSettings(ctx=2048, tensor_split=(1, 1)),
                     [DeviceSpec("A", "rpc"), DeviceSpec("B", "rpc")])
    row = estimate(m, LaunchSettings(ctx=2048, tensor_split=(1, 1), split_mode="row"),
                   [DeviceSpec("A", "rpc"), DeviceSpec("B", "rpc")])
    total = sum(d.weights for d in layer.devices)
    assert abs(sum(d.weights for d in row.devices) - total) < 64 * 4  # rounding per tensor
    # matrices are halved, so the two devices hold about the same
    assert abs(row.devices[0].weights - row.devices[1].weights) < 0.1 * total
    # KV stays with the layers
    assert [d.kv for d in row.devices] == [d.kv for d in layer.devices]


def test_latent_attention_caches_k_only(tmp_path: Path) -> None:
    import gguf
    import numpy as np

    from inference_node.placement.gguf_info import read_model as read

    path = tmp_path / "mla.gguf"
    w = gguf.GGUFWriter(path, "deepseek2")
    w.add_block_count(2)
    w.add_embedding_length(256)
    w.add_context_length(4096)
    w.add_head_count(8)
    w.add_head_count_kv(1)
    w.add_key_length(576)  # the compressed row: kv_lora_rank 512 + 64 rope dims, one head
    w.add_value_length(512)
    w.add_uint32("deepseek2.attention.key_length_mla", 192)
    w.add_uint32("deepseek2.attention.value_length_mla", 128)
    w.add_tensor("token_embd.weight", np.zeros((10, 256), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    m = read(path)
    assert m.is_mla and not m.recurrent
    # 576 values of f16 per cell and layer, no V
    assert kv_total_bytes(m, LaunchSettings(ctx=4096)) == 2 * 4096 * 576 * 2


def test_cuda_reserves_an_f16_copy_of_a_quantized_cache(models: dict[str, Path]) -> None:
    m = read_model(models["head-32"])
    q8 = LaunchSettings(ctx=4096, cache_type_k="q8_0", cache_type_v="q8_0", flash_attn="on")
    f16 = q8.with_(cache_type_k="f16", cache_type_v="f16")

    def compute(s: LaunchSettings, kind: str) -> int:
        return estimate(m, s, [DeviceSpec("A", kind)]).devices[0].compute

    # one layer's K and V as f16: 4096 cells x 128 values x 2 bytes, twice
    assert compute(q8, "cuda") - compute(q8, "rpc") == 2 * 4096 * 128 * 2
    assert compute(f16, "cuda") == compute(f16, "rpc")


def test_quantized_caches_are_rotated_where_the_head_size_allows(tmp_path: Path) -> None:
    # llama_kv_cache: K's matrix is the largest power of two from 64 up dividing the head
    # size, V's is 64; a head size that is no multiple of 64 is never rotated
    def rotations(head_dim: int, k: str, v: str) -> tuple[int, int]:
        spec = TinyModelSpec(n_embd=head_dim * 2, n_head=2, n_ff=64)
        model = read_model(write_tiny_model(tmp_path / f"h{head_dim}.gguf", spec))
        return attn_rotations(model, LaunchSettings(cache_type_k=k, cache_type_v=v))

    assert rotations(64, "f16", "f16") == (0, 0)
    assert rotations(64, "q8_0", "f16") == (64, 0)
    assert rotations(128, "q4_0", "q8_0") == (128, 64)
    assert rotations(192, "q8_0", "q8_0") == (64, 64)
    assert rotations(32, "q8_0", "q8_0") == (0, 0)
