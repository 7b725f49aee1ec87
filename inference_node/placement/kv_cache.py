"""KV-cache sizes per layer, as ``llama_kv_cache`` allocates them.

Per attention layer: ``row_size(type_k, head_dim_k·n_head_kv)`` bytes per cell for K and the
same for V (without flash attention V is stored transposed and padded to the widest
layer), times the cells per stream, times the streams (1 with a unified cache, else one per
``--parallel`` slot). Sliding-window layers keep only
``pad(min(n_ctx_seq, n_swa·n_seq + n_ubatch), 256)`` cells (``llama_kv_cache_iswa``)
unless ``--swa-full``.

A quantized cache also makes llama.cpp rotate what it stores (``attn_rotations``): the
rotation matrices are graph inputs, and the rotated copies change the compute buffer.
"""

from __future__ import annotations

from typing import Final

from inference_node.errors import PlacementError
from inference_node.placement.ggml_sizes import block_size, is_quantized, pad, row_size
from inference_node.placement.gguf_info import ModelInfo
from inference_node.placement.settings import CTX_PAD, LaunchSettings


def kv_cells(model: ModelInfo, s: LaunchSettings, il: int) -> int:
    """KV cells per stream of layer ``il`` (sliding-window layers hold fewer)."""
    n_ctx_seq = s.n_ctx_seq(model.n_ctx_train)
    if not model.swa_layers[il] or s.swa_full:
        return n_ctx_seq
    _, n_ubatch = s.batch_sizes(model.n_ctx_train)
    per = model.sliding_window * (s.n_seq if s.unified else 1) + n_ubatch
    return pad(min(n_ctx_seq, per), CTX_PAD)


def kv_layer_bytes(model: ModelInfo, s: LaunchSettings, il: int) -> tuple[int, int]:
    """(K bytes, V bytes) of layer ``il`` for all its streams; (0, 0) without KV heads."""
    kv_heads = model.n_head_kv[il]
    if kv_heads == 0:
        return 0, 0
    swa = model.swa_layers[il]
    dk = model.head_dim_k_swa if swa else model.head_dim_k
    dv = model.head_dim_v_swa if swa else model.head_dim_v
    if not s.flash:
        # without flash attention V is stored transposed, padded to the widest layer
        dv = max(model.head_dim_v_swa if model.swa_layers[i] else model.head_dim_v
                 for i in range(model.n_layer))
        kv_heads_v = max(model.n_head_kv)
    else:
        kv_heads_v = kv_heads
    checks = [("--cache-type-k", s.cache_type_k, dk)]
    if not model.is_mla:
        checks.append(("--cache-type-v", s.cache_type_v, dv))
    for flag, type_name, dim in checks:
        block = block_size(type_name)
        if dim % block:
            # llama.cpp refuses to create such a context (llama_init_from_model)
            raise PlacementError(f"{flag} {type_name}: blocks of {block} do not divide this "
                                 f"model's head size {dim}; use f16")
    cells = kv_cells(model, s, il) * s.n_stream
    k = row_size(s.cache_type_k, dk * kv_heads) * cells
    if model.is_mla:
        return k, 0  # the latent K row serves as V too
    v = row_size(s.cache_type_v, dv * kv_heads_v) * cells
    return k, v


def kv_total_bytes(model: ModelInfo, s: LaunchSettings) -> int:
    """K and V bytes of every layer together (all on one device)."""
    return sum(sum(kv_layer_bytes(model, s, il)) for il in range(model.n_layer))


# llama_kv_cache rotates K (Q with it) by a Walsh-Hadamard matrix when the K cache type is
# quantized and the head size is a multiple of ROT_MIN (attn_rot_k), and V (the attention
# output back) when the V type is (attn_rot_v); LLAMA_ATTN_ROT_DISABLE=1 turns both off.
# K's matrix is the largest power of two from ROT_MIN up that divides the cache's head
# size (build_input_k_rot: 128 for a head of 128, 64 for 64 or 192); V's is always ROT_V.
ROT_MIN: Final = 64
ROT_V: Final = 64


def attn_rotations(model: ModelInfo, s: LaunchSettings, *, swa: bool = False) -> tuple[int, int]:
    """(K, V) rotation matrix sides of the full-attention (or, ``swa``, the sliding-window)
    KV cache; 0 where llama.cpp rotates nothing."""
    dk = model.head_dim_k_swa if swa else model.head_dim_k
    rot_k = rot_v = 0
    if is_quantized(s.cache_type_k) and model.head_dim_k % ROT_MIN == 0:
        rot_k = max(ROT_MIN, dk & -dk)
    if (not model.is_mla and is_quantized(s.cache_type_v)
            and model.head_dim_v % ROT_MIN == 0):
        rot_v = ROT_V
    return rot_k, rot_v
