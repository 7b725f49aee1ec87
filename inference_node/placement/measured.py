"""Read the memory llama-server reports it allocated, per device, from its log.

With ``-lv 4`` llama-server prints one line per buffer it allocates::

    load_tensors: CUDA0 model buffer size = 3745.00 MiB
    llama_kv_cache: RPC0[127.0.0.1:50061] KV buffer size = 3.00 MiB
    sched_reserve: CPU compute buffer size = 13.07 MiB

These are the ground truth the estimate is measured against. Model and KV buffers of one
device add up (large models and sliding-window caches allocate several); the compute buffer
is re-reserved, so the last report per device counts.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

BUFFER_LINE: Final = re.compile(
    r"(?P<device>\S+)\s+(?P<kind>model|KV|compute|output) buffer size\s*=\s*(?P<mib>[0-9.]+) MiB"
)
# Buffer names of host memory: the mmap'd weights, host copies, repacked CPU weights.
HOST_PREFIXES: Final = ("CPU", "CUDA_Host")


@dataclass
class MeasuredDevice:
    """What one device (or the host) reported, in MiB as printed."""

    model: float = 0.0
    kv: float = 0.0
    compute: float = 0.0

    @property
    def total(self) -> float:
        return self.model + self.kv + self.compute


@dataclass
class MeasuredMemory:
    """Per-device reports keyed by llama.cpp's buffer name (host buffers under ``host``)."""

    devices: dict[str, MeasuredDevice] = field(default_factory=dict)

    @property
    def host(self) -> MeasuredDevice:
        return self.devices.get("host", MeasuredDevice())

    def gpu_names(self) -> list[str]:
        return [name for name in self.devices if name != "host"]


def device_key(buffer_name: str) -> str:
    """``host`` for host buffers (CPU, CPU_Mapped, CUDA_Host, ...), else the name as printed."""
    return "host" if buffer_name.startswith(HOST_PREFIXES) else buffer_name


def parse_memory(lines: Iterable[str]) -> MeasuredMemory:
    """Collect model, KV and compute buffer sizes per device from llama-server log lines."""
    out = MeasuredMemory()
    compute: dict[str, dict[str, float]] = {}
    for line in lines:
        m = BUFFER_LINE.search(line)
        if not m:
            continue
        key = device_key(m.group("device"))
        mib = float(m.group("mib"))
        dev = out.devices.setdefault(key, MeasuredDevice())
        kind = m.group("kind")
        if kind == "model":
            dev.model += mib
        elif kind == "KV":
            dev.kv += mib
        elif kind == "compute":
            # a re-reserve replaces the earlier buffer of that name
            compute.setdefault(key, {})[m.group("device")] = mib
    for key, per_buffer in compute.items():
        out.devices[key].compute = sum(per_buffer.values())
    return out
