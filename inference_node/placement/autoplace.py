"""Placement of configured instances: the edge between the planner and the rest of the agent.

- ``gpus_from_inventory`` adapts the NVML inventory (``inference_node.gpu``) to the
  planner's ``GpuFree``.
- ``request_for(name, config)`` turns an instance's config into an ``InstanceRequest``
  (model path and llama-server flags from either config form).
- ``plan_config(cfg, gpus)`` places every enabled ``gpus = "auto"`` instance at once, largest
  first (what ``node-agent plan --config`` shows).
- ``AutoPlacer`` is the supervisor's launch planner: ``await placer(name, config)`` returns
  the ``LaunchOverrides`` (GPU UUIDs, ``-ngl``, ``-c``, ``--tensor-split``) for an
  ``"auto"`` instance about to start, or None for the others. It plans against NVML's free
  memory now, minus what it planned for other instances in the last ``RESERVATION_S``
  (their llama-server may not have allocated yet). A refusal raises ``PlacementError``,
  which fails that instance with the one-line reason.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import trio

from inference_node.errors import PlacementError
from inference_node.gpu.inventory import GpuInfo, GpuInventory
from inference_node.placement.args import settings_from_args
from inference_node.placement.estimate import estimate
from inference_node.placement.gguf_info import read_model
from inference_node.placement.planner import (
    EMPTY_USED_MIB,
    PROCESS_MIB,
    GpuFree,
    InstanceRequest,
    PlacementResult,
    Refusal,
    need_mib,
    place_one,
    plan_instances,
)
from inference_node.supervisor.launch import LaunchOverrides
from shared.config.node import InstanceConfig, NodeAgentConfig

# A llama-server allocates its buffers within seconds of starting, but a large model on a
# slow disk can take minutes; until then NVML does not show its memory as used.
RESERVATION_S: Final = 300.0


def gpus_from_inventory(infos: Sequence[GpuInfo]) -> list[GpuFree]:
    """The planner's view of NVML's GPUs; a GPU whose memory NVML cannot read offers none."""
    return [GpuFree(g.uuid, g.name, g.index, g.memory_free_mib or 0.0, g.memory_total_mib or 0.0)
            for g in infos]


def request_for(name: str, config: InstanceConfig) -> InstanceRequest:
    """What the planner needs of one instance; PlacementError if its model cannot be read."""
    argv = config.argv_list if config.command is not None else list(config.args)
    model = config.model if config.command is None else _model_from(argv or [])
    if model is None:
        raise PlacementError(f'instances.{name}.gpus: "auto" needs the model path; add '
                             "--model to the command or use model = ...")
    info = read_model(Path(model))
    return InstanceRequest(name, info, settings_from_args(argv or []),
                           config.allow_partial_offload)


def plan_config(cfg: NodeAgentConfig, gpus: Sequence[GpuFree],
                process_mib: float = PROCESS_MIB) -> PlacementResult:
    """Place every enabled ``gpus = "auto"`` instance of ``cfg`` on ``gpus``."""
    requests = [request_for(name, inst) for name, inst in cfg.instances.items()
                if inst.enabled and inst.gpus == "auto"]
    return plan_instances(requests, gpus, cfg.placement.safety_margin_mib, process_mib)


@dataclass(frozen=True)
class _Reservation:
    at: float
    mib_by_gpu: dict[str, float]


class AutoPlacer:
    """Launch planner for ``gpus = "auto"`` instances (see module doc)."""

    def __init__(self, inventory: GpuInventory, margin_mib: float,
                 clock: Callable[[], float] = time.monotonic,
                 process_mib: float = PROCESS_MIB) -> None:
        self._inventory = inventory
        self.margin_mib = margin_mib
        self.process_mib = process_mib
        self._clock = clock
        self._reserved: dict[str, _Reservation] = {}
        # what was decided for each instance, for the status API (JSON-ready)
        self.decisions: dict[str, dict[str, object]] = {}

    def __repr__(self) -> str:
        return f"<AutoPlacer reserved={sorted(self._reserved)} margin={self.margin_mib} MiB>"

    async def __call__(self, name: str, config: InstanceConfig) -> LaunchOverrides | None:
        if config.gpus != "auto":
            return None
        req = await trio.to_thread.run_sync(request_for, name, config)
        infos = await trio.to_thread.run_sync(self._inventory.snapshot)
        return self.decide(req, gpus_from_inventory(infos), self._clock())

    def decide(self, req: InstanceRequest, gpus: Sequence[GpuFree], now: float) -> LaunchOverrides:
        """Pure part: the overrides for ``req`` given the GPUs and the time now."""
        self._reserved.pop(req.name, None)
        if not gpus:
            # CPU-only box: everything on the host, said plainly in the flags
            s = req.settings.with_(ctx=req.settings.ctx or req.model.n_ctx_train)
            est = estimate(req.model, s.with_(n_gpu_layers=0), [])  # raises for bad settings
            self.decisions[req.name] = {"gpus": [], "args": ["-ngl", "0", "-c", str(s.ctx)],
                                        "host_mib": round(est.host.total / 2**20, 2)}
            return LaunchOverrides(args=("-ngl", "0", "-c", str(s.ctx)), gpus=())
        usable = {g.uuid: g.free_mib - self.margin_mib for g in gpus}
        for name, r in list(self._reserved.items()):
            if now - r.at > RESERVATION_S:
                del self._reserved[name]
                continue
            for uuid, mib in r.mib_by_gpu.items():
                if uuid in usable:
                    usable[uuid] -= mib
        usable = {k: max(v, 0.0) for k, v in usable.items()}
        in_use = {g.uuid for g in gpus if g.total_mib - g.free_mib >= EMPTY_USED_MIB}
        in_use |= {u for r in self._reserved.values() for u in r.mib_by_gpu}
        plan = place_one(req, gpus, usable, in_use, self.process_mib)
        if isinstance(plan, Refusal):
            self.decisions[req.name] = {"refused": plan.reason}
            raise PlacementError(plan.reason)
        self._reserved[req.name] = _Reservation(now, {
            g.uuid: need_mib(d, self.process_mib)
            for g, d in zip(plan.gpus, plan.estimate.devices, strict=True)
        })
        self.decisions[req.name] = {
            "gpus": [{"uuid": g.uuid, "index": g.index, "layers": d.layers,
                      "weights_mib": round(d.weights / 2**20, 2), "kv_mib": round(d.kv / 2**20, 2),
                      "compute_mib": round(d.compute / 2**20, 2),
                      "total_mib": round(d.total / 2**20, 2)}
                     for g, d in zip(plan.gpus, plan.estimate.devices, strict=True)],
            "args": plan.launch_args(), "partial_offload": plan.partial,
            "host_mib": round(plan.estimate.host.total / 2**20, 2),
        }
        return LaunchOverrides(args=tuple(plan.launch_args()), gpus=tuple(plan.uuids))


def _model_from(argv: Sequence[str]) -> str | None:
    for i, a in enumerate(argv):
        if a in ("-m", "--model") and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--model="):
            return a.split("=", 1)[1]
    return None
