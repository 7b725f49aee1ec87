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
  ``n_kv × n_ubatch × n_head`` f32 score matrix. The last layer computes its
  feed-forward for the output tokens only, so a device holding just that layer needs
  attention memory only.
- pipeline parallelism also keeps copies of the activations passed between devices:
  ``PIPELINE_FIRST_EMBD·n_embd`` per token on the first device and the host,
  one ``n_embd`` per token on the others.
- logits for the output rows (``n_seq × n_vocab`` f32, twice) on the output device.

Measured on tiny models this lands within a few percent for one device and within about
15% per device across RPC devices; CUDA allocates the same graph, so the same model applies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from inference_node.placement.gguf_info import ModelInfo
from inference_node.placement.kv_cache import kv_cells
from inference_node.placement.settings import LaunchSettings

F32: Final = 4
F16: Final = 2
PIPELINE_COPIES: Final = 4  # GGML_SCHED_MAX_COPIES
FFN_EMBD: Final = 5.0
FFN_FF: Final = 3.0
ATTN_EMBD: Final = 6.0
ATTN_KV: Final = 2.0
PIPELINE_FIRST_EMBD: Final = 10.0
LOGIT_BUFFERS: Final = 2  # logits and their probabilities
HOST: Final = -1


def pipeline_parallel(model: ModelInfo, s: LaunchSettings, n_devices: int) -> bool:
    """llama.cpp enables it for several devices, all layers offloaded, layer split, KV offloaded."""
    ngl = model.n_layer + 1 if s.n_gpu_layers < 0 else s.n_gpu_layers
    return (n_devices > 1 and ngl > model.n_layer and s.split_mode == "layer"
            and s.kv_offload)


def compute_bytes(model: ModelInfo, s: LaunchSettings, assign: Sequence[int], dev: int,
                  *, n_devices: int) -> int:
    """Estimated compute buffer of device ``dev`` (HOST for the CPU) given the layer map."""
    _, ub = s.batch_sizes(model.n_ctx_train)
    n_layer = model.n_layer
    layers = [il for il in range(n_layer) if assign[il] == dev]
    has_output = assign[n_layer] == dev
    pp = pipeline_parallel(model, s, n_devices)
    copies = PIPELINE_COPIES if pp else 1
    e = model.n_embd
    total = 0.0

    if layers:
        mask_bytes = F16 if s.flash else F32
        kinds = {model.swa_layers[il] for il in layers}
        for swa in kinds:
            il = next(i for i in layers if model.swa_layers[i] == swa)
            total += copies * kv_cells(model, s, il) * ub * mask_bytes
        peak = 0.0
        for il in layers:
            kv_embd = model.n_head_kv[il] * model.head_dim_k
            attn = ub * F32 * (ATTN_EMBD * e + ATTN_KV * kv_embd)
            if not s.flash:
                attn += kv_cells(model, s, il) * ub * model.n_head[il] * F32
            phase = attn
            if il != n_layer - 1:
                phase = max(attn, ub * F32 * (FFN_EMBD * e + FFN_FF * _ffn_width(model)))
            peak = max(peak, phase)
        total += peak
    if pp:
        first = next((d for d in assign if d != HOST), HOST)
        if dev in (HOST, first):
            total += PIPELINE_FIRST_EMBD * ub * e * F32
        elif layers:
            total += ub * e * F32
        if dev == HOST and not layers:
            total += copies * kv_cells(model, s, 0) * ub * (F16 if s.flash else F32)
    if has_output:
        total += LOGIT_BUFFERS * s.n_seq * model.n_vocab * F32
    return int(total)


def _ffn_width(model: ModelInfo) -> float:
    if model.n_expert:
        # every used expert's gate and up rows, plus the router's logits
        return model.n_ff_expert * max(model.n_expert_used, 1) + 2 * model.n_expert / FFN_FF
    return model.n_ff
