"""Read the memory-relevant flags out of a llama-server argv, and put a plan's flags in.

``settings_from_args(argv)`` understands the short and long spellings llama-server accepts
for context, slots, cache types, flash attention, layers, split and batch sizes; other
flags pass through untouched. ``apply_plan(argv, plan_args)`` drops the flags a plan sets
and appends the plan's, so the instance's own choices never fight the placement.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, cast

from inference_node.errors import PlacementError
from inference_node.placement.settings import FlashAttn, LaunchSettings

# flag spellings -> LaunchSettings field (flags taking one value)
VALUE_FLAGS: Final = {
    "-c": "ctx", "--ctx-size": "ctx",
    "-np": "parallel", "--parallel": "parallel",
    "-ctk": "cache_type_k", "--cache-type-k": "cache_type_k",
    "-ctv": "cache_type_v", "--cache-type-v": "cache_type_v",
    "-fa": "flash_attn", "--flash-attn": "flash_attn",
    "-ngl": "n_gpu_layers", "--gpu-layers": "n_gpu_layers", "--n-gpu-layers": "n_gpu_layers",
    "-ts": "tensor_split", "--tensor-split": "tensor_split",
    "-sm": "split_mode", "--split-mode": "split_mode",
    "-mg": "main_gpu", "--main-gpu": "main_gpu",
    "-b": "batch", "--batch-size": "batch",
    "-ub": "ubatch", "--ubatch-size": "ubatch",
}
SWITCHES: Final = {
    "-kvu": ("kv_unified", True), "--kv-unified": ("kv_unified", True),
    "-no-kvu": ("kv_unified", False), "--no-kv-unified": ("kv_unified", False),
    "--swa-full": ("swa_full", True),
    "-nkvo": ("kv_offload", False), "--no-kv-offload": ("kv_offload", False),
    "--no-mmap": ("mmap", False), "--mmap": ("mmap", True),
    "-nr": ("repack", False), "--no-repack": ("repack", False),
}
# Flags a plan decides; apply_plan removes the user's copies.
PLANNED: Final = frozenset({"-c", "--ctx-size", "-ngl", "--gpu-layers", "--n-gpu-layers",
                            "-ts", "--tensor-split", "-sm", "--split-mode", "-mg", "--main-gpu"})
_FA_WORDS: Final = {"on": "on", "off": "off", "auto": "auto", "1": "on", "0": "off",
                    "true": "on", "false": "off"}


def settings_from_args(argv: Sequence[str], base: LaunchSettings | None = None) -> LaunchSettings:
    """LaunchSettings from llama-server flags (``--flag value`` or ``--flag=value``)."""
    values: dict[str, object] = {}
    items = _split_eq(argv)
    i = 0
    while i < len(items):
        flag = items[i]
        if flag in SWITCHES:
            key, value = SWITCHES[flag]
            values[key] = value
        elif flag in VALUE_FLAGS:
            if i + 1 >= len(items):
                raise PlacementError(f"{flag} needs a value; add it or remove the flag")
            values[VALUE_FLAGS[flag]] = items[i + 1]
            i += 1
        i += 1
    return _build(values, base or LaunchSettings())


def apply_plan(argv: Sequence[str], plan_args: Sequence[str]) -> list[str]:
    """``argv`` without the flags a plan decides, followed by ``plan_args``."""
    items = _split_eq(argv)
    out: list[str] = []
    i = 0
    while i < len(items):
        if items[i] in PLANNED:
            i += 2
            continue
        out.append(items[i])
        i += 1
    return out + list(plan_args)


def _split_eq(argv: Sequence[str]) -> list[str]:
    out: list[str] = []
    for a in argv:
        flag, eq, value = a.partition("=")
        if eq and flag.startswith("-") and (flag in VALUE_FLAGS or flag in PLANNED):
            out += [flag, value]
        else:
            out.append(a)
    return out


def _build(values: dict[str, object], base: LaunchSettings) -> LaunchSettings:
    changes: dict[str, object] = {}
    try:
        for key, raw in values.items():
            if isinstance(raw, bool):
                changes[key] = raw
            elif key in ("ctx", "parallel", "n_gpu_layers", "main_gpu"):
                changes[key] = int(str(raw))
            elif key == "batch":
                changes["n_batch"] = int(str(raw))
            elif key == "ubatch":
                changes["n_ubatch"] = int(str(raw))
            elif key == "tensor_split":
                parts = str(raw).replace("/", ",").split(",")
                changes[key] = tuple(float(p) for p in parts if p.strip())
            elif key == "flash_attn":
                word = _FA_WORDS.get(str(raw).lower())
                if word is None:
                    raise PlacementError(f"--flash-attn {raw}: expected on, off or auto")
                changes[key] = cast(FlashAttn, word)
            elif key == "split_mode":
                if raw not in ("layer", "row", "none"):
                    raise PlacementError(f"--split-mode {raw}: expected layer, row or none")
                changes[key] = raw
            else:
                changes[key] = str(raw).lower()
    except ValueError as exc:
        raise PlacementError(f"llama-server flags: {exc}; fix the value in args") from exc
    if changes.get("parallel") == -1:  # llama-server's explicit "auto"
        changes["parallel"] = None
    return base.with_(**changes)


def settings_to_args(s: LaunchSettings, *, unified_flag: bool = True) -> list[str]:
    """Every memory-relevant flag of ``s`` spelled out, so another llama.cpp program
    (llama-fit-params, whose defaults differ from llama-server's) sees the same settings."""
    out = ["-c", str(s.ctx or 0), "-np", str(s.n_seq), "-ctk", s.cache_type_k,
           "-ctv", s.cache_type_v, "-fa", s.flash_attn, "-ngl", str(s.n_gpu_layers),
           "-sm", s.split_mode, "-b", str(s.n_batch), "-ub", str(s.n_ubatch)]
    if unified_flag:  # llama-server only; llama-fit-params rejects it
        out.append("-kvu" if s.unified else "-no-kvu")
    if s.tensor_split:
        out += ["-ts", ",".join(f"{x:g}" for x in s.tensor_split)]
    if s.swa_full:
        out.append("--swa-full")
    if not s.kv_offload:
        out.append("-nkvo")
    if not s.mmap:
        out.append("--no-mmap")
    if not s.repack:
        out.append("--no-repack")
    return out
