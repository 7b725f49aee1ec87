"""Choose GPUs, ``-ngl``, ``--tensor-split`` and ``-c`` for instances with ``gpus = "auto"``.

Pure policy: ``plan_instances(requests, gpus, margin_mib)`` takes the GPU inventory (free
memory per GPU, keyed by UUID) and the instances, and returns a plan or a one-line refusal
per instance. Rules, in order:

1. One GPU when the whole model fits on one. Among those that fit, a GPU that is already in
   use (by another instance of this plan, or by anything else) wins over an empty one, and
   then the tightest fit: empty GPUs stay empty and can sit in their lowest P-state.
2. Otherwise the fewest GPUs that hold it, again preferring GPUs in use; each GPU in turn
   takes as many layers as fit its free memory (``--tensor-split`` as whole layer counts),
   which keeps what is left together on the last GPU for the next instance; shares in
   proportion to free memory are the fallback.
3. An instance without ``-c`` first gets a smaller context (down to ``FIT_MIN_CTX``), the
   way llama.cpp's own fitting does; the plan's ``-c`` says which.
4. Otherwise, when the instance allows partial offload, the most layers (``-ngl``) that fit,
   the rest running on the CPU.
5. Otherwise a refusal that says how much is missing and what would fit (a smaller ``-c``,
   a q8_0 KV cache).

Instances are placed largest first; each placement uses up the memory it was planned with.
Every GPU keeps ``margin_mib`` free (fragmentation, other programs, estimate error), and
each instance on a GPU also needs ``PROCESS_MIB`` outside llama.cpp's buffers: its own CUDA
context and library workspaces, which every llama-server process pays again.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from inference_node.errors import PlacementError
from inference_node.placement.estimate import (
    DeviceEstimate,
    DeviceSpec,
    Estimate,
    estimate,
    layer_devices,
)
from inference_node.placement.ggml_sizes import MIB
from inference_node.placement.gguf_info import ModelInfo
from inference_node.placement.settings import CTX_PAD, LaunchSettings

# A GPU with less than this in use counts as empty (a bare driver context takes a few MiB).
EMPTY_USED_MIB: Final = 256
# Smallest context a refusal suggests; below this a chat model is of little use.
MIN_SUGGESTED_CTX: Final = 1024
# Per process and GPU, outside llama.cpp's buffers: the CUDA context with lazily loaded
# kernels and the cuBLAS workspace (a few hundred MiB on current drivers).
PROCESS_MIB: Final = 300
# GPU sets tried per size: the best by the packing order; more only costs time.
MAX_SETS_PER_SIZE: Final = 12
# Without -c, the context shrinks to fit but not below this (llama.cpp's --fit-ctx default).
FIT_MIN_CTX: Final = 4096


@dataclass(frozen=True)
class GpuFree:
    """One GPU as the planner sees it; adapt the inventory's type to this at the edge."""

    uuid: str
    name: str
    index: int
    free_mib: float
    total_mib: float


@dataclass(frozen=True)
class InstanceRequest:
    """One instance to place: its model, its launch settings, whether it may run partly on CPU."""

    name: str
    model: ModelInfo
    settings: LaunchSettings
    allow_partial_offload: bool = False


@dataclass
class InstancePlan:
    """Where one instance goes and the flags that put it there."""

    name: str
    gpus: list[GpuFree]
    settings: LaunchSettings
    estimate: Estimate
    partial: bool = False

    @property
    def uuids(self) -> list[str]:
        return [g.uuid for g in self.gpus]

    def env(self) -> dict[str, str]:
        """Environment for the child: only the chosen GPUs, by UUID, in this order."""
        return {"CUDA_VISIBLE_DEVICES": ",".join(self.uuids)}

    def args(self) -> list[str]:
        """llama-server flags that realize this plan (they replace the user's own)."""
        s = self.settings
        out = ["-ngl", str(self.estimate.n_gpu_layers), "-c", str(s.ctx or 0)]
        if len(self.gpus) > 1:
            out += ["-sm", "layer", "-ts", ",".join(_num(x) for x in s.tensor_split)]
        return out

    def launch_args(self) -> list[str]:
        """``args()`` plus the split flags spelled out for one GPU too, so that flags appended
        after an instance's own arguments (the last one wins) override any it had."""
        out = self.args()
        if len(self.gpus) == 1:
            out += ["-sm", "layer", "-mg", "0", "-ts", "1"]
        return out


@dataclass(frozen=True)
class Refusal:
    """Why an instance cannot be placed, as one line."""

    name: str
    reason: str


@dataclass
class PlacementResult:
    plans: dict[str, InstancePlan] = field(default_factory=dict)
    refusals: dict[str, Refusal] = field(default_factory=dict)
    free_after_mib: dict[str, float] = field(default_factory=dict)


def plan_instances(requests: Sequence[InstanceRequest], gpus: Sequence[GpuFree],
                   margin_mib: float, process_mib: float = PROCESS_MIB) -> PlacementResult:
    """Place every request on ``gpus`` (see module doc); a request that does not fit is
    refused, not raised (PlacementError only for settings llama.cpp itself would reject)."""
    usable = {g.uuid: max(g.free_mib - margin_mib, 0.0) for g in gpus}
    in_use = {g.uuid for g in gpus if g.total_mib - g.free_mib >= EMPTY_USED_MIB}
    result = PlacementResult()
    order = sorted(requests, key=lambda r: -_need_one_device(r))
    for req in order:
        plan = place_one(req, gpus, usable, in_use, process_mib)
        if isinstance(plan, Refusal):
            result.refusals[req.name] = plan
            continue
        result.plans[req.name] = plan
        for g, dev in zip(plan.gpus, plan.estimate.devices, strict=True):
            usable[g.uuid] -= need_mib(dev, process_mib)
            in_use.add(g.uuid)
    planned = {g.uuid: 0.0 for g in gpus}
    for plan in result.plans.values():
        for g, dev in zip(plan.gpus, plan.estimate.devices, strict=True):
            planned[g.uuid] += need_mib(dev, process_mib)
    result.free_after_mib = {g.uuid: g.free_mib - planned[g.uuid] for g in gpus}
    return result


def place_one(req: InstanceRequest, gpus: Sequence[GpuFree], usable: dict[str, float],
              in_use: set[str], process_mib: float = PROCESS_MIB) -> InstancePlan | Refusal:
    """The plan for one instance given the memory still usable per GPU, or a refusal."""
    # what this instance's buffers may take of each GPU, after its process's own share
    usable = {u: max(v - process_mib, 0.0) for u, v in usable.items()}
    s = req.settings.with_(ctx=req.settings.ctx or req.model.n_ctx_train, split_mode="layer",
                           n_gpu_layers=-1, tensor_split=())
    full = _fit_full(req.model, s, gpus, usable, in_use)
    if full is None and not req.settings.ctx:
        # No -c given: like llama.cpp's own fitting, shrink the context (not below
        # FIT_MIN_CTX) before giving up; the plan's -c says what was chosen.
        ctx = _largest_ctx(req.model, s, gpus, usable, floor=FIT_MIN_CTX)
        if ctx is not None:
            s = s.with_(ctx=ctx)
            full = _fit_full(req.model, s, gpus, usable, in_use)
    if full is not None:
        return InstancePlan(req.name, full[0], full[1].settings_used, full[1].est)
    if req.allow_partial_offload:
        partial = _fit_partial(req.model, s, gpus, usable, in_use)
        if partial is not None:
            return InstancePlan(req.name, partial[0], partial[1].settings_used, partial[1].est,
                                partial=True)
    return Refusal(req.name, _refusal(req, s, gpus, usable))


@dataclass
class _Fit:
    settings_used: LaunchSettings
    est: Estimate


def need_mib(dev: DeviceEstimate, process_mib: float = PROCESS_MIB) -> float:
    """What one instance takes of a GPU: llama.cpp's buffers plus the process's own."""
    return dev.total / MIB + process_mib


def _fits(est: Estimate, chosen: Sequence[GpuFree], room: dict[str, float]) -> bool:
    return all(d.total / MIB <= room[g.uuid] for d, g in zip(est.devices, chosen, strict=True))


def _candidates(gpus: Sequence[GpuFree], usable: dict[str, float], in_use: set[str],
                k: int, floor_mib: float = 0.0) -> list[tuple[GpuFree, ...]]:
    """GPU sets of size k that hold at least ``floor_mib`` together, those using fewest
    empty GPUs first, then most usable memory; at most MAX_SETS_PER_SIZE of them."""
    live = [g for g in gpus if usable[g.uuid] > 0]
    combos = [c for c in itertools.combinations(sorted(live, key=lambda g: g.index), k)
              if sum(usable[g.uuid] for g in c) >= floor_mib]
    combos.sort(key=lambda c: (sum(g.uuid not in in_use for g in c),
                               -sum(usable[g.uuid] for g in c)))
    return combos[:MAX_SETS_PER_SIZE]


def _fit_full(model: ModelInfo, s: LaunchSettings, gpus: Sequence[GpuFree],
              usable: dict[str, float], in_use: set[str]) -> tuple[list[GpuFree], _Fit] | None:
    # one GPU: among the fitting ones, in-use first, then the tightest fit
    singles: list[tuple[tuple[bool, float], GpuFree, Estimate]] = []
    for g in gpus:
        est = estimate(model, s, [DeviceSpec(g.name)])
        if _fits(est, [g], usable):
            singles.append(((g.uuid not in in_use, usable[g.uuid] - est.total / MIB), g, est))
    if singles:
        _, g, est = min(singles, key=lambda t: t[0])
        return [g], _Fit(s, est)
    # weights and KV must fit somewhere: GPU sets with less memory than that cannot hold it
    floor = estimate(model, s, [DeviceSpec("floor")]).devices[0]
    floor_mib = (floor.weights + floor.kv) / MIB
    for k in range(2, len(gpus) + 1):
        for combo in _candidates(gpus, usable, in_use, k, floor_mib):
            fit = _split(model, s, list(combo), usable, model.n_layer + 1)
            if fit is not None:
                return list(combo), fit
    return None


def _fit_partial(model: ModelInfo, s: LaunchSettings, gpus: Sequence[GpuFree],
                 usable: dict[str, float], in_use: set[str]) -> tuple[list[GpuFree], _Fit] | None:
    """The most offloaded layers on the fewest GPUs (more layers win over fewer GPUs)."""
    best: tuple[int, int, list[GpuFree], _Fit] | None = None
    for k in range(1, len(gpus) + 1):
        for combo in _candidates(gpus, usable, in_use, k)[:1]:
            # fewer offloaded layers never need more: binary search the most that fit
            lo, hi, found = 1, model.n_layer, None
            while lo <= hi:
                mid = (lo + hi) // 2
                fit = _split(model, s, list(combo), usable, mid)
                if fit is not None:
                    found, lo = (mid, fit), mid + 1
                else:
                    hi = mid - 1
            if found is not None and (best is None or found[0] > best[0]):
                best = (found[0], k, list(combo), found[1])
    return None if best is None else (best[2], best[3])


def _split(model: ModelInfo, s: LaunchSettings, chosen: list[GpuFree],
           usable: dict[str, float], ngl: int) -> _Fit | None:
    """Layer counts per GPU (as ``--tensor-split``) so each share fits, or None."""
    n_dev = len(chosen)
    devices = [DeviceSpec(g.name) for g in chosen]
    n_off = min(ngl, model.n_layer + 1)
    trial = s.with_(n_gpu_layers=ngl)
    if n_dev == 1:
        est = estimate(model, trial, devices)
        return _Fit(trial, est) if _fits(est, chosen, usable) else None
    caps = [usable[g.uuid] for g in chosen]
    # Greedy first: filling each GPU in turn leaves the free memory together on the last
    # one, where the next instance can still fit; proportional shares are the fallback.
    for counts in (_greedy_counts(model, trial, chosen, usable, n_off),
                   _counts_by_weight(caps, n_off)):
        if counts is None or min(counts) == 0:
            continue
        split = tuple(float(c) for c in counts)
        settings = trial.with_(tensor_split=split)
        # the rule must give back exactly these counts; it does for whole-number splits
        assign = layer_devices(model.n_layer, n_dev, ngl, split)
        if [sum(1 for a in assign if a == d) for d in range(n_dev)] != counts:
            continue
        est = estimate(model, settings, devices)
        if _fits(est, chosen, usable):
            return _Fit(settings, est)
    return None


def _counts_by_weight(weights: Sequence[float], n: int) -> list[int]:
    """Split n layers in proportion to weights, largest remainders first."""
    total = sum(weights) or 1.0
    raw = [w / total * n for w in weights]
    counts = [int(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: counts[i] - raw[i])[: n - sum(counts)]:
        counts[i] += 1
    return counts


def _greedy_counts(model: ModelInfo, s: LaunchSettings, chosen: list[GpuFree],
                   usable: dict[str, float], n_off: int) -> list[int] | None:
    """Fill each GPU in turn with as many layers as fit; the last takes the rest."""
    n_dev = len(chosen)
    devices = [DeviceSpec(g.name) for g in chosen]
    counts = [0] * n_dev
    left = n_off

    def fits(d: int, c: int) -> bool:
        trial = [*counts[:d], c, *_spread(left - c, n_dev - 1 - d)]
        est = estimate(model, s.with_(tensor_split=tuple(float(x) for x in trial)), devices)
        return est.devices[d].total / MIB <= usable[chosen[d].uuid]

    for d in range(n_dev - 1):
        # a GPU's share grows with its layer count: binary search the largest that fits
        lo, hi = 0, left - (n_dev - 1 - d)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(d, mid):
                lo = mid
            else:
                hi = mid - 1
        if lo == 0:
            return None
        counts[d] = lo
        left -= lo
    counts[-1] = left
    return counts


def _spread(n: int, k: int) -> list[int]:
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def _need_one_device(req: InstanceRequest) -> float:
    s = req.settings.with_(ctx=req.settings.ctx or req.model.n_ctx_train, n_gpu_layers=-1,
                           tensor_split=(), split_mode="layer")
    return estimate(req.model, s, [DeviceSpec("gpu")]).total / MIB


def _refusal(req: InstanceRequest, s: LaunchSettings, gpus: Sequence[GpuFree],
             usable: dict[str, float]) -> str:
    need = _need_one_device(req)
    avail = sum(usable.values())
    if not gpus:
        where = "no GPU is visible"
    else:
        where = (f"the GPUs have {avail:.0f} MiB usable together "
                 f"(largest {max(usable.values()):.0f} MiB)")
    short = need - avail
    if short > 0 or not gpus:
        gap = f"{max(short, 0):.0f} MiB short"
    else:
        gap = "no split fits either, as each GPU also needs its own compute buffer"
    hints = _suggestions(req, s, gpus, usable)
    hint = "; " + " or ".join(hints) + " would fit" if hints else "; nothing smaller fits either"
    partial = "" if req.allow_partial_offload else \
        " (allow_partial_offload = true would run part of it on the CPU)"
    return (f"instance {req.name}: needs {need:.0f} MiB at -c {s.ctx}, {where}: "
            f"{gap}{hint}{partial}")


def _suggestions(req: InstanceRequest, s: LaunchSettings, gpus: Sequence[GpuFree],
                 usable: dict[str, float]) -> list[str]:
    out: list[str] = []
    q8: LaunchSettings | None = s.with_(cache_type_k="q8_0", cache_type_v="q8_0", flash_attn="on")
    try:
        if _fit_full(req.model, q8, gpus, usable, set()) is not None:  # type: ignore[arg-type]
            out.append("--cache-type-k q8_0 --cache-type-v q8_0")
    except PlacementError:
        q8 = None  # the model's head size does not take a q8_0 cache
    ctx = _largest_ctx(req.model, s, gpus, usable)
    if ctx is not None:
        out.append(f"-c {ctx}")
    elif not out and q8 is not None:
        ctx = _largest_ctx(req.model, q8, gpus, usable)
        if ctx is not None:
            out.append(f"-c {ctx} with a q8_0 KV cache")
    return out


def _largest_ctx(model: ModelInfo, s: LaunchSettings, gpus: Sequence[GpuFree],
                 usable: dict[str, float], floor: int = 0) -> int | None:
    """The largest -c below ``s.ctx`` (a multiple of 256, at least ``floor`` or
    MIN_SUGGESTED_CTX) that fits, or None."""
    lo = max(floor, MIN_SUGGESTED_CTX) // CTX_PAD
    hi = max((s.ctx or 0) // CTX_PAD - 1, 0)
    if hi < lo or _fit_full(model, s.with_(ctx=lo * CTX_PAD), gpus, usable, set()) is None:
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _fit_full(model, s.with_(ctx=mid * CTX_PAD), gpus, usable, set()) is not None:
            lo = mid
        else:
            hi = mid - 1
    return lo * CTX_PAD


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"
