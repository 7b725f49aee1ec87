"""Compute-buffer estimate: the peak activation memory llama.cpp reserves per device.

llama.cpp sizes the compute buffer by allocating its worst-case graph (one ubatch of
``n_ubatch`` tokens, the whole KV cache visible) with in-place reuse; no closed formula
gives the result. This module models the peak from the parts that dominate it, with
coefficients calibrated against ``sched_reserve: ... compute buffer size`` lines of this
llama.cpp build on the CPU and RPC backends (``benchmarks/placement_accuracy.py`` re-checks
them):

- the attention mask, an input every device with attention layers holds:
  ``n_kv × n_ubatch`` cells, f16 with flash attention, f32 without; a second one for
  sliding-window layers. With pipeline parallelism (several devices, everything offloaded)
  the scheduler keeps ``PIPELINE_COPIES`` copies of each input.
- the per-token activations of the widest phase of a layer, in f32 values per token:
  feed-forward ``FFN_EMBD·n_embd + FFN_FF·n_ff`` (``n_ff`` of each used expert for MoE);
  attention ``ATTN_EMBD·n_embd + ATTN_KV·n_embd_kv``, plus without flash attention the
  ``n_kv × n_ubatch × n_head`` f32 score matrix. The host, which also holds the input
  embeddings, needs ``HOST_EMBD·n_embd`` (and ``HOST_ATTN_KV·n_embd_kv`` in attention) more.
  The last layer computes its feed-forward for the output rows only, so a device holding
  just that layer needs attention memory only. A device whose first layer's input comes
  from another backend (partial offload, no pipeline parallelism) needs
  ``RELAYED_FFN_EMBD·n_embd`` in the dense feed-forward instead.
- with a quantized K or V cache llama.cpp rotates Q and K (or V and the attention output)
  by Walsh-Hadamard matrices (``kv_cache.attn_rotations``): each device, and the host, holds
  one matrix input per KV cache whose layers it computes (per copy), and the rotated copies
  move the feed-forward peak of a relayed device (``_relayed_ffn_embd``).
- a host that holds no layer still prepares the inputs: the masks and
  ``HOST_INPUT_EMBD·n_embd`` per token; the first device receives ``FIRST_DEVICE_EMBD·n_embd``.
- pipeline parallelism also keeps copies of the activations passed between devices:
  ``PIPELINE_FIRST_EMBD·n_embd`` per token on the first device (and the host),
  ``PIPELINE_OTHER_EMBD·n_embd`` on the others.
- without flash attention, ``NO_FA_KV_INPUT_BYTES`` per KV cell and KV value per copy and
  per KV cache (sliding-window models have two), for at most ``NO_FA_KV_INPUT_MAX_UBATCHES``
  × ``n_ubatch`` cells of all streams together.
- on CUDA with flash attention and a K/V cache that is not f16, an f16 copy of one
  layer's cache (``_cuda_fa_staging``; from llama.cpp's source, not measured here).
- on the output device, the output rows (one per slot): logits twice and
  ``OUTPUT_EMBD·n_embd`` of activations, f32.

Over eight model shapes (``benchmarks/placement_accuracy.py``) this lands within 2.5%
(1.2 MiB) on the host or one RPC device, with or without a partial offload, and within 12%
(4.1 MiB) per device across two RPC devices; the largest misses are a few MiB on gemma2
(its feed-forward needs less than modeled) and on a 7B-wide layer split over two devices.
CUDA allocates the same graph with the same allocator, so the model carries over; its
CUDA-only scratch (cuBLAS workspace, the flash-attention pool) lies outside these buffers
and inside the safety margin.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from inference_node.placement.gguf_info import ModelInfo
from inference_node.placement.kv_cache import attn_rotations, kv_cells
from inference_node.placement.settings import LaunchSettings

F32: Final = 4
F16: Final = 2
PIPELINE_COPIES: Final = 4  # GGML_SCHED_MAX_COPIES
FFN_EMBD: Final = 3.0
# A device without layer 0 (and without pipeline parallelism) gets its first layer's input
# from another backend: the scheduler moves that backend's last weightless op, the residual
# add, onto the device, which receives its two halves (``ffn_out``, ``ffn_inp``) as inputs
# instead of one embedding. The freed halves leave the dense feed-forward one ``n_embd``
# less fragmentation: measured ``2·n_embd + 3·n_ff`` per token for -ngl 2..8 of 9 on one
# and two devices, n_embd 384..2048, n_ff 1024..5632, -ub 16..512. MoE layers (another
# allocation order) measure as ``FFN_EMBD``. An f32 cache measures as ``FFN_EMBD`` on some
# shapes; with the KV cache on the host (-nkvo) attention runs there and the device
# measures as ``FFN_EMBD`` too.
RELAYED_FFN_EMBD: Final = 2.0
# A quantized cache is the same as f16 unless llama.cpp rotates it (``attn_rotations``):
# rotating one of K and V (Q and K each get a rotated f32 copy, or V and the attention
# output) leaves allocation holes that take the gap back, ``FFN_EMBD`` again; rotating both
# leaves it at ``RELAYED_FFN_EMBD`` (measured on five dense shapes, one and two devices,
# q8_0 and q4_0, each against LLAMA_ATTN_ROT_DISABLE=1). A model with post-attention and
# post-feed-forward norms (gemma2's ``post_ffw_norm``) has the rotated copies' holes fit
# its feed-forward's tensors instead: one rotation measures ``ROTATED_POST_NORM_FFN_EMBD``
# on two devices (and one n_embd less still on one device, left as margin).
ROTATED_POST_NORM_FFN_EMBD: Final = 1.0
FFN_FF: Final = 3.0
ATTN_EMBD: Final = 4.0
ATTN_KV: Final = 1.0
# The host also holds the input embeddings and their copies on the way to a device.
HOST_EMBD: Final = 2.0
HOST_ATTN_KV: Final = 2.0
PIPELINE_FIRST_EMBD: Final = 12.0
PIPELINE_OTHER_EMBD: Final = 3.0
# Without pipeline parallelism: the host feeding devices, and the first device it feeds.
HOST_INPUT_EMBD: Final = 4.0
FIRST_DEVICE_EMBD: Final = 1.0
# Without flash attention each device (and, with pipeline parallelism, the host) holds one
# more input per copy that grows with the cache: measured at 1 byte per cell and KV value.
NO_FA_KV_INPUT_BYTES: Final = 1
# ... and that input stops growing at this many ubatches of cells (measured: -c 4096..16384,
# -ub 128..1024, 1 to 4 streams, one and two devices give exactly min(cells, 8 * n_ubatch)).
NO_FA_KV_INPUT_MAX_UBATCHES: Final = 8
LOGIT_BUFFERS: Final = 2  # logits and their probabilities
OUTPUT_EMBD: Final = 5.0  # the output rows' activations through norm and output matrix
HOST: Final = -1


def pipeline_parallel(model: ModelInfo, s: LaunchSettings, n_devices: int) -> bool:
    """llama.cpp enables it for several devices, all layers offloaded, layer split, KV offloaded."""
    ngl = model.n_layer + 1 if s.n_gpu_layers < 0 else s.n_gpu_layers
    return (n_devices > 1 and ngl > model.n_layer and s.split_mode == "layer"
            and s.kv_offload)


def compute_bytes(model: ModelInfo, s: LaunchSettings, assign: Sequence[int], dev: int,
                  *, n_devices: int, kind: str = "cpu") -> int:
    """Estimated compute buffer of device ``dev`` (HOST for the CPU) given the layer map;
    ``kind`` is the device's backend (cuda, rpc, cpu)."""
    _, ub = s.batch_sizes(model.n_ctx_train)
    n_layer = model.n_layer
    e = model.n_embd
    layers = [il for il in range(n_layer) if assign[il] == dev]
    pp = pipeline_parallel(model, s, n_devices)
    copies = PIPELINE_COPIES if pp else 1
    # a host without layers still prepares the inputs (embeddings, masks) for the devices
    feeds_only = dev == HOST and not layers and n_devices > 0
    first = next((d for d in assign if d != HOST), HOST)
    total = 0.0

    mask_layers = layers or (list(range(n_layer)) if feeds_only else [])
    for swa in {model.swa_layers[il] for il in mask_layers}:
        il = next(i for i in mask_layers if model.swa_layers[i] == swa)
        total += copies * kv_cells(model, s, il) * ub * (F16 if s.flash else F32)
    if not s.flash and (layers or feeds_only) and not (dev == HOST and not feeds_only):
        kv_embd = max(model.n_head_kv) * model.head_dim_k
        cells = max(kv_cells(model, s, il) for il in range(n_layer))
        # one per KV cache whose layers this device computes: sliding-window models keep two
        # (full and windowed layers), and a device holding layers of one kind only gets
        # that cache's input (measured: gemma2 with only its last, full layer on a device)
        n_caches = len({model.swa_layers[il] for il in mask_layers}) if not s.swa_full else 1
        cells = min(cells * s.n_stream, NO_FA_KV_INPUT_MAX_UBATCHES * ub)
        total += n_caches * copies * cells * kv_embd * NO_FA_KV_INPUT_BYTES
    total += copies * _rotation_inputs(model, s, mask_layers)
    ffn_embd = (_relayed_ffn_embd(model, s) if dev != HOST and not pp and assign[0] != dev
                and s.kv_offload else FFN_EMBD)
    total += max((_layer_peak(model, s, il, dev == HOST, ub, ffn_embd) for il in layers),
                 default=0.0)
    if kind == "cuda" and layers:
        total += _cuda_fa_staging(model, s, layers)

    if feeds_only:
        total += (PIPELINE_FIRST_EMBD - HOST_EMBD if pp else HOST_INPUT_EMBD) * ub * e * F32
    elif dev == first and dev != HOST:
        if pp:
            total += PIPELINE_FIRST_EMBD * ub * e * F32
        elif assign[0] != HOST:  # it receives the embeddings straight from the host
            total += FIRST_DEVICE_EMBD * ub * e * F32
    elif pp and layers:
        total += PIPELINE_OTHER_EMBD * ub * e * F32
    if assign[n_layer] == dev:
        total += s.n_seq * F32 * (LOGIT_BUFFERS * model.n_vocab + OUTPUT_EMBD * e)
    return int(total)


def _relayed_ffn_embd(model: ModelInfo, s: LaunchSettings) -> float:
    """The feed-forward's ``n_embd`` coefficient on a device whose first layer's input comes
    from another backend (see ``RELAYED_FFN_EMBD``)."""
    if model.n_expert or "f32" in (s.cache_type_k, s.cache_type_v):
        return FFN_EMBD
    rot_k, rot_v = attn_rotations(model, s)
    if bool(rot_k) == bool(rot_v):
        return RELAYED_FFN_EMBD
    return ROTATED_POST_NORM_FFN_EMBD if model.post_norms else FFN_EMBD


def _rotation_inputs(model: ModelInfo, s: LaunchSettings, layers: Sequence[int]) -> float:
    """Bytes of the rotation matrices (f32) of the KV caches that ``layers`` use."""
    total = 0
    for swa in {model.swa_layers[il] for il in layers if model.n_head_kv[il]}:
        rot_k, rot_v = attn_rotations(model, s, swa=swa)
        total += (rot_k * rot_k + rot_v * rot_v) * F32
    return total


def _layer_peak(model: ModelInfo, s: LaunchSettings, il: int, on_host: bool, ub: int,
                ffn_embd: float = FFN_EMBD) -> float:
    """Bytes of the widest phase (attention or feed-forward) of layer ``il``; ``ffn_embd``:
    the feed-forward's ``n_embd`` coefficient (less on a relayed device)."""
    e = model.n_embd
    kv_embd = model.n_head_kv[il] * model.head_dim_k
    extra = HOST_EMBD * e if on_host else 0.0
    attn = ub * F32 * (ATTN_EMBD * e + extra
                       + (HOST_ATTN_KV if on_host else ATTN_KV) * kv_embd)
    if not s.flash:
        attn += kv_cells(model, s, il) * ub * model.n_head[il] * F32
    if il == model.n_layer - 1:
        return attn  # the last layer's feed-forward runs on the output rows only
    return max(attn, ub * F32 * (ffn_embd * e + extra + FFN_FF * _ffn_width(model)))


def _cuda_fa_staging(model: ModelInfo, s: LaunchSettings, layers: Sequence[int]) -> float:
    """CUDA's flash attention converts a non-f16 K/V cache to f16 for its tensor-core kernels
    and reserves that copy in the compute buffer (``ggml_cuda_flash_attn_ext_get_alloc_size``):
    the whole cache of one layer, K and V. Not measured here (no CUDA in the benchmark)."""
    if not s.flash:
        return 0.0
    worst = 0.0
    for il in layers:
        cells = kv_cells(model, s, il) * s.n_stream
        kv_embd = model.n_head_kv[il] * model.head_dim_k
        size = sum(cells * kv_embd * F16 for t in (s.cache_type_k, s.cache_type_v) if t != "f16")
        worst = max(worst, size)
    return worst


def _ffn_width(model: ModelInfo) -> float:
    if model.n_expert:
        # every used expert's gate and up rows, plus the router's logits
        return model.n_ff_expert * max(model.n_expert_used, 1) + 2 * model.n_expert / FFN_FF
    return model.n_ff
