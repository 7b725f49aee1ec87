"""What one instance takes of each device, from the llama-server flags it really runs with.

``instance_footprint(model, argv, devices)`` reads the memory-relevant flags out of the
instance's argv (``-c``, ``-np``, ``-ctk/-ctv``, ``-fa``, ``-ngl``, ``-ts``, ``-kvu``,
``-b/-ub``, ``--no-mmap``, ``--no-repack``; ``args.settings_from_args``), estimates
llama.cpp's buffers per device (``estimate.estimate``) and adds what every process pays
outside them: ``PROCESS_MIB`` per GPU (CUDA context, cuBLAS workspace) and
``HOST_PROCESS_MIB`` of system memory (the binary, its libraries, the HTTP server). This is
the number a scheduler compares with free memory before it starts the instance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from inference_node.placement.args import settings_from_args
from inference_node.placement.estimate import DeviceSpec, Estimate, estimate
from inference_node.placement.ggml_sizes import mib
from inference_node.placement.gguf_info import ModelInfo
from inference_node.placement.planner import PROCESS_MIB
from inference_node.placement.repack import CpuFeatures
from inference_node.placement.settings import LaunchSettings

# A llama-server's own resident memory beside llama.cpp's buffers (binary, shared libraries,
# threads, the HTTP server and its slots' token buffers): a tiny model's whole process is
# about 50 MiB resident on this build, buffers included, so this is a round upper bound.
HOST_PROCESS_MIB: Final = 64


@dataclass(frozen=True)
class Footprint:
    """MiB per device (in device order, process overhead included) and of the host."""

    devices: tuple[tuple[str, float], ...]
    host_mib: float
    estimate: Estimate

    @property
    def device_mib(self) -> dict[str, float]:
        return dict(self.devices)

    @property
    def total_mib(self) -> float:
        return sum(m for _, m in self.devices) + self.host_mib


def instance_footprint(model: ModelInfo, argv: Sequence[str], devices: Sequence[DeviceSpec],
                       process_mib: float = PROCESS_MIB,
                       cpu: CpuFeatures | None = None) -> Footprint:
    """Estimated MiB per device and host for ``model`` run with ``argv`` on ``devices``
    (none: a CPU-only host). PlacementError for flags llama.cpp itself would reject."""
    return settings_footprint(model, settings_from_args(argv), devices, process_mib, cpu)


def settings_footprint(model: ModelInfo, s: LaunchSettings, devices: Sequence[DeviceSpec],
                       process_mib: float = PROCESS_MIB,
                       cpu: CpuFeatures | None = None) -> Footprint:
    """``instance_footprint`` for settings already read from the flags."""
    s = s.with_(ctx=s.ctx or model.n_ctx_train)
    if not devices:
        s = s.with_(n_gpu_layers=0)
    est = estimate(model, s, devices, cpu)
    per_dev = tuple((d.name, mib(d.total) + process_mib) for d in est.devices)
    return Footprint(per_dev, mib(est.host.total) + HOST_PROCESS_MIB, est)
