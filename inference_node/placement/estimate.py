"""Memory per device for one model and one set of launch settings, as llama.cpp allocates it.

Three parts per device, each reproducing one of llama-server's ``-lv 4`` lines:

- weights (``model buffer size``): llama.cpp's layer-to-device rule (``layer_devices``) puts
  whole ``blk.N`` layers on devices; the input layer (``token_embd``) stays on the host; the
  output layer (``output``, ``output_norm``, and ``token_embd`` again for tied embeddings)
  counts as layer ``n_layer`` and goes where the rule puts it (the last device when all is
  offloaded). Each tensor is padded as that backend pads it.
- KV cache (``KV buffer size``): per attention layer, ``row_size(type_k, head_dim_k·n_head_kv)``
  plus the same for V, times the cells (context padded to 256, per stream; sliding-window
  layers hold ``pad(min(n_ctx_seq, n_swa·n_seq + n_ubatch), 256)``), on the layer's device.
- compute buffer (``compute buffer size``): no closed formula exists; ``compute.py`` holds a
  model of the peak activation memory calibrated against llama-server's reports.

With ``--split-mode row`` each matrix is cut by rows across all devices in the split
proportions (approximate); norms, KV and compute stay with the layer's device.
The host (system RAM) is reported too, as ``Placement.host``; it is not what placement
packs, so its compute estimate is coarse.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from inference_node.errors import PlacementError
from inference_node.placement.compute import compute_bytes
from inference_node.placement.ggml_sizes import ALIGNMENT, alloc_size, mib, pad
from inference_node.placement.gguf_info import ModelInfo, TensorInfo
from inference_node.placement.kv_cache import kv_layer_bytes
from inference_node.placement.repack import NO_REPACK, CpuFeatures, host_cpu, is_repacked
from inference_node.placement.settings import LaunchSettings

HOST: Final = -1  # device index of the host (CPU) in layer assignments


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator as llama.cpp sees it: a display name and a backend kind (cuda, rpc)."""

    name: str
    kind: str = "cuda"


@dataclass
class DeviceEstimate:
    """Bytes one device needs; ``layers`` are the block numbers placed there (output = n_layer)."""

    name: str
    layers: list[int] = field(default_factory=list)
    weights: int = 0
    kv: int = 0
    compute: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.compute

    def mib(self) -> dict[str, float]:
        return {"weights": mib(self.weights), "kv": mib(self.kv), "compute": mib(self.compute),
                "total": mib(self.total)}


@dataclass
class Estimate:
    """Per-device estimates in device order, plus the host."""

    devices: list[DeviceEstimate]
    host: DeviceEstimate
    n_ctx: int
    n_ctx_seq: int
    n_gpu_layers: int

    @property
    def total(self) -> int:
        return sum(d.total for d in self.devices)


def layer_devices(n_layer: int, n_devices: int, n_gpu_layers: int,
                  tensor_split: Sequence[float] = ()) -> list[int]:
    """Device index of layers ``0..n_layer`` (the last is the output layer); HOST for the CPU.

    llama.cpp's rule (``llama_model::load_tensors``): the last ``n_gpu_layers`` of the
    ``n_layer + 1`` layers are offloaded; offloaded layer ``il`` goes to the first device whose
    cumulative split proportion exceeds ``(il - i_gpu_start) / n_offloaded``. Proportions
    count layers, not bytes. The arithmetic is done in float32 as llama.cpp does it, so
    boundary cases land on the same device.
    """
    import numpy as np  # ~12 MB: loaded when a layout is first computed, not at agent start

    if n_devices == 0:
        return [HOST] * (n_layer + 1)
    ngl = n_layer + 1 if n_gpu_layers < 0 else n_gpu_layers
    weights = list(tensor_split[:n_devices]) + [0.0] * (n_devices - len(tensor_split))
    if not any(weights):
        weights = [1.0] * n_devices  # llama.cpp splits by free memory here; equal is our stand-in
    cum = np.cumsum(np.asarray(weights, dtype=np.float32), dtype=np.float32)
    splits = cum / cum[-1]
    i_gpu_start = max(n_layer + 1 - ngl, 0)
    act = min(ngl, n_layer + 1)
    out = []
    for il in range(n_layer + 1):
        if il < i_gpu_start or il - i_gpu_start >= act:
            out.append(HOST)
            continue
        x = np.float32(il - i_gpu_start) / np.float32(act)
        out.append(int(np.searchsorted(splits, x, side="right")))
    return out


def estimate(model: ModelInfo, s: LaunchSettings, devices: Sequence[DeviceSpec],
             cpu: CpuFeatures | None = None) -> Estimate:
    """Bytes per device (and host) for ``model`` launched with ``s`` on ``devices``;
    ``cpu`` decides which host weights are repacked (default: this machine's CPU)."""
    if s.split_mode == "none":
        if devices and not 0 <= s.main_gpu < len(devices):
            raise PlacementError(f"--main-gpu {s.main_gpu}: only {len(devices)} device(s) visible")
        used = [devices[s.main_gpu]] if devices else []
    else:
        used = list(devices)
    ngl = model.n_layer + 1 if s.n_gpu_layers < 0 else s.n_gpu_layers
    split = s.tensor_split if s.split_mode != "none" else ()
    if split and len(split) > len(used):
        raise PlacementError(f"--tensor-split has {len(split)} proportions for {len(used)} "
                             "device(s); give one per device")
    assign = layer_devices(model.n_layer, len(used), ngl, split)
    ests = [DeviceEstimate(d.name) for d in used]
    host = DeviceEstimate("host")

    def target(dev: int) -> DeviceEstimate:
        return host if dev == HOST else ests[dev]

    def kind(dev: int) -> str:
        return "cpu" if dev == HOST else used[dev].kind

    row_split = s.split_mode == "row" and len(used) > 1
    shares = _shares(split, len(used))

    def add_weights(dev: int, tensors: Sequence[TensorInfo]) -> None:
        k = kind(dev)
        for t in tensors:
            if row_split and dev != HOST and len(t.shape) >= 2:
                # row split: each matrix is cut by rows across every device (approximate:
                # llama.cpp rounds the cut to whole row blocks)
                for d, share in enumerate(shares):
                    ests[d].weights += int(alloc_size(kind(d), t.type_name, t.shape,
                                                      t.n_bytes) * share)
                continue
            target(dev).weights += alloc_size(k, t.type_name, t.shape, t.n_bytes)

    kv = _kv_per_layer(model, s)
    add_weights(HOST, model.input_tensors)
    for il in range(model.n_layer + 1):
        dev = assign[il]
        target(dev).layers.append(il)
        if il == model.n_layer and dev == HOST and model.tied_embeddings:
            # on the host the "copy" of token_embd is the same mapped file data
            add_weights(dev, [t for t in model.output_tensors if t.name != "token_embd.weight"])
        elif row_split:
            add_weights(dev, model.layer_tensors(il) if il < model.n_layer
                        else model.output_tensors)
        else:
            target(dev).weights += _layer_weights(model, kind(dev))[il]
        if il < model.n_layer:
            kv_dev = dev if s.kv_offload else HOST
            align = ALIGNMENT[kind(kv_dev)]
            target(kv_dev).kv += sum(pad(part, align) for part in kv[il])

    if s.mmap:
        features = (cpu or host_cpu()) if s.repack else NO_REPACK
        host.weights = _mapped_span(model, assign, features)
    for dev, est in enumerate(ests):
        est.compute = compute_bytes(model, s, assign, dev, n_devices=len(used),
                                    kind=used[dev].kind)
    host.compute = compute_bytes(model, s, assign, HOST, n_devices=len(used))
    return Estimate(devices=ests, host=host, n_ctx=s.n_ctx(model.n_ctx_train),
                    n_ctx_seq=s.n_ctx_seq(model.n_ctx_train), n_gpu_layers=ngl)


def _mapped_span(model: ModelInfo, assign: Sequence[int], cpu: CpuFeatures) -> int:
    """Host weights with mmap: llama.cpp maps, per file, the span from the first to the last
    byte of the tensors the host uses, so tensors of devices stored in between count too.
    Weights the CPU backend repacks leave the mapping for a ``CPU_REPACK`` copy of their own
    (``repack.py``); they count once, at their size, and the span shrinks around them."""
    host_tensors = list(model.input_tensors)
    for il in range(model.n_layer):
        if assign[il] == HOST:
            host_tensors += model.layer_tensors(il)
    if assign[model.n_layer] == HOST:
        host_tensors += [t for t in model.output_tensors if t.name != "token_embd.weight"]
    repacked = [t for t in host_tensors if is_repacked(t, cpu)]
    names = {t.name for t in repacked}
    spans: dict[int, tuple[int, int]] = {}
    for t in host_tensors:
        if t.name in names:
            continue
        lo, hi = spans.get(t.file_index, (t.offset, t.offset + t.n_bytes))
        spans[t.file_index] = (min(lo, t.offset), max(hi, t.offset + t.n_bytes))
    copies = sum(alloc_size("cpu", t.type_name, t.shape, t.n_bytes) for t in repacked)
    return sum(hi - lo for lo, hi in spans.values()) + copies


def _shares(split: Sequence[float], n: int) -> list[float]:
    weights = [float(x) for x in split[:n]] + [0.0] * (n - len(split[:n]))
    if not any(weights):
        weights = [1.0] * n
    total = sum(weights)
    return [w / total for w in weights]


def _layer_weights(model: ModelInfo, kind: str) -> tuple[int, ...]:
    """Allocated bytes of layers 0..n_layer (the last is the output layer) on a backend kind;
    computed once per model and kind (the planner asks for thousands of estimates)."""
    key = ("layer_weights", kind)
    cached = model.cache.get(key)
    if cached is None:
        groups = [model.layer_tensors(il) for il in range(model.n_layer)]
        groups.append(model.output_tensors)
        cached = tuple(sum(alloc_size(kind, t.type_name, t.shape, t.n_bytes) for t in g)
                       for g in groups)
        model.cache[key] = cached
    result: tuple[int, ...] = cached  # type: ignore[assignment]
    return result


def _kv_per_layer(model: ModelInfo, s: LaunchSettings) -> tuple[tuple[int, int], ...]:
    """(K, V) bytes per layer for the cache-shaping settings; computed once per combination."""
    key = ("kv", s.cache_type_k, s.cache_type_v, s.flash, s.ctx, s.n_seq, s.unified,
           s.n_batch, s.n_ubatch, s.swa_full)
    cached = model.cache.get(key)
    if cached is None:
        cached = tuple(kv_layer_bytes(model, s, il) for il in range(model.n_layer))
        model.cache[key] = cached
    result: tuple[tuple[int, int], ...] = cached  # type: ignore[assignment]
    return result
