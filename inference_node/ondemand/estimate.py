"""An instance's estimated MiB per device, as the on-demand scheduler compares them.

The model and flags come from the instance's config (``autoplace.request_for``: the
structured form or a ``command`` with ``--model``); the MiB from
``placement.footprint.settings_footprint`` (llama.cpp's buffers plus each process's own
share). Devices: the GPUs the child will see, resolved as CUDA does (``gpu.assign``: indices
of ``gpus = [...]`` in PCI bus order, UUIDs, or ``env.CUDA_VISIBLE_DEVICES``), every GPU for
``gpus = "auto"`` or none given (llama.cpp spreads over all of them), and ``"host"`` on a
CPU-only box, where ``agent.memory_budget_mib`` is the limit. Reading a GGUF header takes
a few milliseconds to a second, so results are kept per instance config and GPU set.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final

import trio

from inference_node.gpu.assign import cuda_order, env_for_gpus, gpus_for_env
from inference_node.gpu.inventory import GpuInfo
from inference_node.placement.autoplace import request_for
from inference_node.placement.estimate import DeviceSpec
from inference_node.placement.footprint import settings_footprint
from shared.config.node import InstanceConfig
from shared.errors import LlamanapError

HOST_DEVICE: Final = "host"

_Key = tuple[str, str, tuple[str, ...]]  # name, the config as text, the GPU set


def instance_need(name: str, cfg: InstanceConfig, gpus: Sequence[GpuInfo]) -> dict[str, float]:
    """MiB per device key (GPU UUID, or ``host`` without GPUs); LlamanapError when the model
    cannot be read, its flags are not ones llama.cpp accepts, or its GPUs are not there."""
    req = request_for(name, cfg)
    chosen = _chosen(name, cfg, gpus)
    fp = settings_footprint(req.model, req.settings, [DeviceSpec(u) for u in chosen])
    if not chosen:
        return {HOST_DEVICE: fp.host_mib}
    return {uuid: mib for uuid, (_, mib) in zip(chosen, fp.devices, strict=True)}


def _chosen(name: str, cfg: InstanceConfig, gpus: Sequence[GpuInfo]) -> list[str]:
    """UUIDs of the GPUs the child sees, in its CUDA order."""
    if not gpus:
        return []
    if cfg.gpus == "auto":
        return [g.uuid for g in cuda_order(gpus)]
    env = env_for_gpus(cfg.gpus, gpus) if isinstance(cfg.gpus, list) else dict(cfg.env)
    assignment = gpus_for_env(env, gpus)
    if not assignment.gpus and (cfg.gpus or env):
        raise LlamanapError(f"instances.{name}.gpus: {'; '.join(assignment.problems)}")
    return list(assignment.gpus)


class InstanceEstimator:
    """``await need(name, cfg, gpus)`` -> (MiB per device, None) or (None, the reason)."""

    def __init__(self) -> None:
        self._cache: dict[_Key, tuple[dict[str, float] | None, str | None]] = {}

    async def need(self, name: str, cfg: InstanceConfig, gpus: Sequence[GpuInfo]
                   ) -> tuple[Mapping[str, float] | None, str | None]:
        key = (name, repr(cfg), tuple(sorted(g.uuid for g in gpus)))
        if key not in self._cache:
            self._cache[key] = await trio.to_thread.run_sync(self._compute, name, cfg, gpus)
        return self._cache[key]

    @staticmethod
    def _compute(name: str, cfg: InstanceConfig, gpus: Sequence[GpuInfo]
                 ) -> tuple[dict[str, float] | None, str | None]:
        try:
            return instance_need(name, cfg, gpus), None
        except (LlamanapError, OSError, ValueError) as exc:
            return None, f"cannot estimate its memory: {exc}"
