"""``node-agent analyze`` and ``node-agent plan``: what a model is, and where it would go.

``analyze MODEL.gguf`` prints the architecture facts and sizes read from the GGUF header.
``plan MODEL.gguf`` estimates memory per device for the given flags and places the model on
this box's GPUs (NVML free memory), or on hypothetical ones (``--assume-gpus``); without
NVML it plans for the host and says so. ``--check`` runs llama.cpp's own dry run
(``llama-fit-params``) with the chosen flags and prints its numbers beside ours.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from inference_node.errors import PlacementError
from inference_node.placement.args import settings_to_args
from inference_node.placement.estimate import DeviceEstimate, DeviceSpec, Estimate, estimate
from inference_node.placement.ggml_sizes import KV_CACHE_TYPES, mib
from inference_node.placement.gguf_info import ModelInfo, read_model
from inference_node.placement.planner import (
    PROCESS_MIB,
    GpuFree,
    InstancePlan,
    InstanceRequest,
    Refusal,
    plan_instances,
)
from inference_node.placement.settings import DEFAULT_BATCH, DEFAULT_UBATCH, LaunchSettings
from shared.cli import EXIT_FAILURE, EXIT_OK

DEFAULT_MARGIN_MIB = 512


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    a = sub.add_parser("analyze", help="show a GGUF model's layers, sizes and architecture",
                       description="Read a GGUF header (never the weights) and print what "
                       "placement uses: layers, sizes, heads, KV heads, sliding window.")
    a.add_argument("model", type=Path, help="the .gguf file (first part of a split model)")
    a.add_argument("--layers", action="store_true", help="also list every layer's size")
    a.add_argument("--json", action="store_true", help="print JSON")
    a.set_defaults(func=_analyze)

    p = sub.add_parser("plan", help="estimate VRAM per GPU and choose -ngl/--tensor-split",
                       description="Estimate memory per device as llama.cpp allocates it and "
                       "place the model on this box's GPUs.")
    p.add_argument("model", type=Path, nargs="?", help="the .gguf file (or use --config)")
    p.add_argument("--config", type=Path, default=None, metavar="NODE_AGENT_TOML",
                   help='place every enabled gpus = "auto" instance of this config instead')
    p.add_argument("-c", "--ctx", type=int, default=None, help="context (default: the model's)")
    p.add_argument("-np", "--parallel", type=int, default=None,
                   help="slots (default: llama-server's auto, 4 with a unified KV cache)")
    p.add_argument("-ctk", "--cache-type-k", default="f16", choices=KV_CACHE_TYPES)
    p.add_argument("-ctv", "--cache-type-v", default="f16", choices=KV_CACHE_TYPES)
    p.add_argument("-fa", "--flash-attn", default="auto", choices=("on", "off", "auto"))
    p.add_argument("-b", "--batch-size", type=int, default=DEFAULT_BATCH)
    p.add_argument("-ub", "--ubatch-size", type=int, default=DEFAULT_UBATCH)
    p.add_argument("-kvu", "--kv-unified", action="store_true", default=None,
                   help="one KV cache shared by all slots (llama-server's default without -np)")
    p.add_argument("-ngl", "--gpu-layers", type=int, default=None,
                   help="offload exactly this many layers (estimate these flags, no search)")
    p.add_argument("-ts", "--tensor-split", default=None, metavar="N,N,...",
                   help="split layers over the GPUs in these proportions (estimate as given)")
    p.add_argument("-nr", "--no-repack", action="store_true",
                   help="as llama-server's: keep quantized CPU weights unrepacked")
    p.add_argument("--no-mmap", action="store_true", help="as llama-server's")
    p.add_argument("--host", action="store_true",
                   help="plan for the host (system RAM) only, even where GPUs are visible")
    p.add_argument("--gpus", default=None,
                   help="comma-separated GPU UUIDs or NVML indices to consider (default: all)")
    p.add_argument("--assume-gpus", default=None, metavar="MIB,MIB,...",
                   help="plan for hypothetical empty GPUs with this much free memory each")
    p.add_argument("--margin-mib", type=float, default=DEFAULT_MARGIN_MIB,
                   help=f"memory kept free on every GPU (default {DEFAULT_MARGIN_MIB})")
    p.add_argument("--process-mib", type=float, default=PROCESS_MIB,
                   help="GPU memory each llama-server process needs outside llama.cpp's "
                   f"buffers (CUDA context, workspaces; default {PROCESS_MIB})")
    p.add_argument("--allow-partial-offload", action="store_true",
                   help="if it does not fit, offload fewer layers instead of refusing")
    p.add_argument("--check", action="store_true",
                   help="also run llama-fit-params with the chosen flags and show its numbers")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_plan)


def analysis(model: ModelInfo) -> dict[str, Any]:
    """The facts ``analyze`` shows, as plain data."""
    sizes = model.layer_bytes
    return {
        "path": str(model.path), "files": [str(f) for f in model.files],
        "architecture": model.architecture, "name": model.name, "n_layer": model.n_layer,
        "n_embd": model.n_embd, "n_ff": model.n_ff, "n_head": list(model.n_head),
        "n_head_kv": list(model.n_head_kv), "head_dim_k": model.head_dim_k,
        "head_dim_v": model.head_dim_v, "n_ctx_train": model.n_ctx_train,
        "n_vocab": model.n_vocab, "n_expert": model.n_expert,
        "n_expert_used": model.n_expert_used, "sliding_window": model.sliding_window,
        "swa_layers": [i for i, s in enumerate(model.swa_layers) if s],
        "swa_pattern_known": model.swa_pattern_known,
        "tied_embeddings": model.tied_embeddings, "is_mla": model.is_mla,
        "recurrent": model.recurrent, "total_mib": mib(model.total_bytes),
        "input_mib": mib(model.input_bytes), "output_mib": mib(model.output_bytes),
        "layer_mib": [mib(b) for b in sizes],
    }


def _analyze(args: argparse.Namespace) -> int:
    model = read_model(args.model)
    facts = analysis(model)
    if args.json:
        print(json.dumps(facts, indent=2))
        return EXIT_OK
    heads = _compact(model.n_head)
    kv_heads = _compact(model.n_head_kv)
    sizes = model.layer_bytes
    print(f"{model.path}  ({len(model.files)} file(s), {facts['total_mib']:.2f} MiB)")
    print(f"  architecture    {model.architecture}  ({model.name or 'unnamed'})")
    print(f"  layers          {model.n_layer} (+1 output layer)")
    print(f"  embedding       {model.n_embd}, feed-forward {model.n_ff}")
    print(f"  heads           {heads}, KV heads {kv_heads}"
          f"{'  (GQA)' if model.is_gqa else ''}, head dim K {model.head_dim_k} V {model.head_dim_v}")
    print(f"  context (train) {model.n_ctx_train}")
    print(f"  vocab           {model.n_vocab}")
    if model.n_expert:
        print(f"  experts         {model.n_expert} ({model.n_expert_used} used per token)")
    if model.sliding_window:
        swa = sum(model.swa_layers)
        known = "" if model.swa_pattern_known else " (pattern unknown: all counted as full)"
        print(f"  sliding window  {model.sliding_window} tokens on {swa} of {model.n_layer} "
              f"layers{known}")
    if model.is_mla:
        print("  attention       multi-head latent (the KV cache holds one compressed K row)")
    if model.recurrent:
        print("  recurrent       yes: per-slot recurrent state is not in the estimate")
    print(f"  embeddings      {'tied (output reuses token_embd)' if model.tied_embeddings else 'separate output matrix'}")
    print(f"  input layer     {facts['input_mib']:.2f} MiB (stays on the host)")
    print(f"  output layer    {facts['output_mib']:.2f} MiB")
    if sizes:
        print(f"  repeating layer {mib(min(sizes)):.2f} .. {mib(max(sizes)):.2f} MiB each, "
              f"{mib(sum(sizes)):.2f} MiB together")
    if args.layers:
        for il, size in enumerate(sizes):
            kind = "  sliding window" if model.swa_layers[il] else ""
            print(f"    blk.{il:<4} {mib(size):>10.2f} MiB  KV heads {model.n_head_kv[il]}{kind}")
    return EXIT_OK


def _compact(values: tuple[int, ...]) -> str:
    return str(values[0]) if len(set(values)) <= 1 else "per layer " + ",".join(map(str, values))


def _settings(args: argparse.Namespace) -> LaunchSettings:
    split: tuple[float, ...] = ()
    if args.tensor_split:
        try:
            split = tuple(float(x) for x in args.tensor_split.replace("/", ",").split(",") if x)
        except ValueError:
            raise PlacementError(f"-ts {args.tensor_split}: expected proportions like "
                                 "1,3") from None
    return LaunchSettings(ctx=args.ctx, parallel=args.parallel, kv_unified=args.kv_unified,
                          cache_type_k=args.cache_type_k, cache_type_v=args.cache_type_v,
                          flash_attn=args.flash_attn, n_batch=args.batch_size,
                          n_ubatch=args.ubatch_size, tensor_split=split,
                          n_gpu_layers=-1 if args.gpu_layers is None else args.gpu_layers,
                          mmap=not args.no_mmap, repack=not args.no_repack)


def inventory_gpus(selection: str | None) -> tuple[list[GpuFree], str | None]:
    """GPUs from NVML as the planner's type, and why there are none (CPU-only) if so."""
    from inference_node.gpu.inventory import open_inventory

    inv = open_inventory()
    gpus = [GpuFree(g.uuid, g.name, g.index, g.memory_free_mib or 0.0, g.memory_total_mib or 0.0)
            for g in inv.snapshot()]
    if selection:
        wanted = {w.strip() for w in selection.split(",") if w.strip()}
        gpus = [g for g in gpus if g.uuid in wanted or str(g.index) in wanted]
        if not gpus:
            raise PlacementError(f"--gpus {selection}: no such GPU; use UUIDs or NVML indices "
                                 "from nvidia-smi -L")
    return gpus, inv.problem


def _assumed(spec: str) -> list[GpuFree]:
    try:
        sizes = [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise PlacementError(f"--assume-gpus {spec}: expected MiB numbers like 24576,12288") from None
    return [GpuFree(f"assumed-{i}", f"GPU{i} ({s:.0f} MiB)", i, s, s) for i, s in enumerate(sizes)]


def _plan(args: argparse.Namespace) -> int:
    if args.config is not None:
        return _plan_config(args)
    if args.model is None:
        raise PlacementError("plan: give a MODEL.gguf or --config NODE_AGENT_TOML")
    model = read_model(args.model)
    settings = _settings(args)
    if args.host:
        return _host_plan(args, model, settings, "--host")
    if args.assume_gpus:
        gpus, problem = _assumed(args.assume_gpus), None
    else:
        gpus, problem = inventory_gpus(args.gpus)
    if not gpus:
        return _host_plan(args, model, settings, problem or "no GPU selected")
    if args.gpu_layers is not None or args.tensor_split:
        return _fixed_plan(args, model, settings, gpus)
    req = InstanceRequest(args.model.stem, model, settings, args.allow_partial_offload)
    result = plan_instances([req], gpus, args.margin_mib, args.process_mib)
    if req.name in result.refusals:
        refusal: Refusal = result.refusals[req.name]
        if args.json:
            print(json.dumps({"model": str(args.model), "refused": refusal.reason}))
        else:
            print(refusal.reason)
        return EXIT_FAILURE
    plan = result.plans[req.name]
    check = (_check(args, model, plan.settings, [DeviceSpec(g.name) for g in plan.gpus],
                    plan.env()) if args.check else None)
    if args.json:
        print(json.dumps(_plan_json(args.model, plan, check), indent=2))
    else:
        _print_plan(args.model, model, plan, check)
    return EXIT_OK


def _plan_config(args: argparse.Namespace) -> int:
    from inference_node.placement.autoplace import plan_config
    from shared.config.node import load_node_config

    cfg = load_node_config(args.config)
    if args.assume_gpus:
        gpus, problem = _assumed(args.assume_gpus), None
    else:
        gpus, problem = inventory_gpus(args.gpus)
    result = plan_config(cfg, gpus, args.process_mib)
    if args.json:
        print(json.dumps({
            "config": str(args.config), "no_gpus": problem,
            "plans": {n: {"gpus": p.uuids, "args": p.args(), "env": p.env(),
                          "partial_offload": p.partial,
                          "per_gpu_mib": [round(mib(d.total), 2) for d in p.estimate.devices]}
                      for n, p in result.plans.items()},
            "refused": {n: r.reason for n, r in result.refusals.items()},
            "free_after_mib": {u: round(f, 2) for u, f in result.free_after_mib.items()},
        }, indent=2))
        return EXIT_FAILURE if result.refusals else EXIT_OK
    if problem:
        print(f"no GPUs ({problem}): every auto instance would run on the host")
    for name, plan in result.plans.items():
        where = ",".join(f"{g.index}" for g in plan.gpus)
        sizes = " + ".join(f"{mib(d.total):.0f}" for d in plan.estimate.devices)
        print(f"{name}: GPU {where} ({sizes} MiB){' partial' if plan.partial else ''}: "
              f"CUDA_VISIBLE_DEVICES={plan.env()['CUDA_VISIBLE_DEVICES']} {' '.join(plan.args())}")
    for refusal in result.refusals.values():
        print(refusal.reason)
    for g in gpus:
        print(f"GPU {g.index} {g.name}: {result.free_after_mib[g.uuid]:.0f} of "
              f"{g.free_mib:.0f} MiB free left")
    return EXIT_FAILURE if result.refusals else EXIT_OK


def _fixed_plan(args: argparse.Namespace, model: ModelInfo, settings: LaunchSettings,
                gpus: list[GpuFree]) -> int:
    """-ngl or -ts given: estimate exactly those flags on the selected GPUs (one per -ts
    proportion, else all of them), and say whether each share fits its free memory."""
    if settings.tensor_split:
        if len(settings.tensor_split) > len(gpus):
            raise PlacementError(f"-ts {args.tensor_split}: {len(settings.tensor_split)} "
                                 f"proportions for {len(gpus)} GPU(s); give one per GPU")
        gpus = gpus[:len(settings.tensor_split)]
    s = settings.with_(ctx=settings.ctx or model.n_ctx_train)
    est = estimate(model, s, [DeviceSpec(g.name) for g in gpus])
    room = [g.free_mib - args.margin_mib - args.process_mib for g in gpus]
    fits = all(mib(d.total) <= r for d, r in zip(est.devices, room, strict=True))
    flags = settings_to_args(s)
    if args.json:
        print(json.dumps({
            "model": str(args.model), "fits": fits, "args": flags,
            "gpus": [{"uuid": g.uuid, "name": g.name, "index": g.index, "free_mib": g.free_mib,
                      "need_mib": round(mib(d.total) + args.process_mib, 2), **_dev_json(d)}
                     for g, d in zip(gpus, est.devices, strict=True)],
            "host": _dev_json(est.host), "n_ctx": est.n_ctx}, indent=2))
        return EXIT_OK if fits else EXIT_FAILURE
    print(f"{args.model.name}: as given (-ngl {est.n_gpu_layers}), n_ctx {est.n_ctx} "
          f"({model.n_layer} layers + output)")
    rows: list[tuple[str, DeviceEstimate, float | None]] = [
        (f"{g.index}:{g.name}", d, g.free_mib) for g, d in zip(gpus, est.devices, strict=True)]
    rows.append(("host", est.host, None))
    _print_table(rows, est)
    print(f"flags: {' '.join(flags)}")
    if not fits:
        print(f"does not fit: each GPU also keeps {args.margin_mib:.0f} MiB free and "
              f"{args.process_mib:.0f} MiB for the process; lower -ngl or change -ts")
    return EXIT_OK if fits else EXIT_FAILURE


def _host_plan(args: argparse.Namespace, model: ModelInfo, settings: LaunchSettings,
               problem: str) -> int:
    s = settings.with_(ctx=settings.ctx or model.n_ctx_train, n_gpu_layers=0)
    est = estimate(model, s, [])
    check = _check(args, model, s, [], {}) if args.check else None
    if args.json:
        print(json.dumps({"model": str(args.model), "host_only": problem,
                          "host": _dev_json(est.host), "args": ["-ngl", "0", "-c", str(s.ctx)],
                          "check": check}, indent=2))
        return EXIT_OK
    lead = "host only" if args.host else "no GPUs"
    print(f"{lead} ({problem}): plan for the host (system RAM)")
    _print_table([("host", est.host, None)], est)
    print(f"flags: -ngl 0 -c {s.ctx}")
    _print_check(check)
    return EXIT_OK


def _check(args: argparse.Namespace, model: ModelInfo, s: LaunchSettings,
           devices: list[DeviceSpec], env: dict[str, str]) -> list[dict[str, Any]]:
    """llama-fit-params' numbers per device beside ours for the settings it runs with.

    llama-fit-params has no ``--kv-unified``: with several slots it sizes one KV stream per
    slot, so our side of the comparison is estimated for that too.
    """
    from inference_node.placement.fit_check import run_fit_params
    from shared.llama_bin import find_tool

    tool = find_tool("llama-fit-params")
    lines = run_fit_params(tool, args.model, settings_to_args(s, unified_flag=False), env)
    as_run = s.with_(parallel=s.n_seq, kv_unified=s.n_seq == 1)
    ours_est = estimate(model, as_run, devices)
    ours = [*ours_est.devices, ours_est.host]
    rows = []
    for i, x in enumerate(lines):
        mine = ours[i] if i < len(ours) else None
        rows.append({
            "device": x.device,
            "llama_cpp_mib": {"model": x.model_mib, "context": x.context_mib,
                              "compute": x.compute_mib, "total": x.total_mib},
            "ours_mib": None if mine is None else {
                "model": round(mib(mine.weights), 2), "context": round(mib(mine.kv), 2),
                "compute": round(mib(mine.compute), 2), "total": round(mib(mine.total), 2)},
        })
    return rows


def _dev_json(d: DeviceEstimate) -> dict[str, Any]:
    return {"layers": d.layers, **{f"{k}_mib": round(v, 2) for k, v in d.mib().items()}}


def _plan_json(path: Path, plan: InstancePlan, check: list[dict[str, Any]] | None
               ) -> dict[str, Any]:
    return {
        "model": str(path), "partial_offload": plan.partial,
        "gpus": [{"uuid": g.uuid, "name": g.name, "index": g.index, "free_mib": g.free_mib,
                  **_dev_json(d), "pct_of_free": round(100 * d.total / 2**20 / g.free_mib, 1)
                  if g.free_mib else None}
                 for g, d in zip(plan.gpus, plan.estimate.devices, strict=True)],
        "host": _dev_json(plan.estimate.host), "env": plan.env(), "args": plan.args(),
        "n_ctx": plan.estimate.n_ctx, "check": check,
    }


def _print_plan(path: Path, model: ModelInfo, plan: InstancePlan,
                check: list[dict[str, Any]] | None) -> None:
    est = plan.estimate
    what = "partial offload" if plan.partial else "all layers on GPU"
    print(f"{path.name}: {len(plan.gpus)} GPU(s), {what}, n_ctx {est.n_ctx} "
          f"({model.n_layer} layers + output)")
    rows: list[tuple[str, DeviceEstimate, float | None]] = [
        (f"{g.index}:{g.name}", d, g.free_mib) for g, d in
        zip(plan.gpus, est.devices, strict=True)]
    rows.append(("host", est.host, None))
    _print_table(rows, est)
    print(f"env:   CUDA_VISIBLE_DEVICES={plan.env()['CUDA_VISIBLE_DEVICES']}")
    print(f"flags: {' '.join(plan.args())}")
    _print_check(check)


def _print_table(rows: list[tuple[str, DeviceEstimate, float | None]], est: Estimate) -> None:
    print(f"{'device':<28} {'layers':>9} {'weights':>10} {'KV':>9} {'compute':>9} "
          f"{'total':>10} {'% free':>7}   (MiB)")
    for name, d, free in rows:
        layers = _layer_span(d.layers)
        pct = f"{100 * mib(d.total) / free:.0f}%" if free else "-"
        print(f"{name[:28]:<28} {layers:>9} {mib(d.weights):>10.2f} {mib(d.kv):>9.2f} "
              f"{mib(d.compute):>9.2f} {mib(d.total):>10.2f} {pct:>7}")


def _layer_span(layers: list[int]) -> str:
    if not layers:
        return "-"
    return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])


def _print_check(check: list[dict[str, Any]] | None) -> None:
    if not check:
        return
    print("check: llama-fit-params (llama.cpp's own dry run) vs this estimate, MiB:")
    print(f"  {'device':<24} {'model':>15} {'context':>15} {'compute':>15} {'total':>15}")
    for row in check:
        theirs, ours = row["llama_cpp_mib"], row["ours_mib"] or {}
        cells = " ".join(f"{theirs[k]:>7}/{ours.get(k, '-')!s:<7}"
                         for k in ("model", "context", "compute", "total"))
        print(f"  {row['device']:<24} {cells}")
