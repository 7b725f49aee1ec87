"""What is loaded on each GPU, by estimate and as llama-server reported it: pure.

``gpu_memory(uuids, placed, estimates, reported)`` sums, per GPU, the placement estimate of
every instance running on it (``estimates``: MiB per device key, the scheduler's numbers)
and the buffers its llama-server said it allocated there (``reported``: its ``-lv 4``
``CUDAi ... buffer size = N MiB`` lines, parsed by ``placement.measured``). ``placed`` gives
each running instance's GPUs in the child's CUDA order, which is how ``CUDAi`` in its log
maps to a UUID. A GPU with no instance on it has 0 of both (it is empty); a number nobody
gave (no estimate, no buffer line yet) is None rather than a made-up 0.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from inference_node.placement.measured import MeasuredMemory

# llama.cpp names CUDA devices by their index among the ones the process sees.
CUDA_DEVICE: Final = re.compile(r"^CUDA(\d+)$")


@dataclass(frozen=True)
class GpuMemory:
    """One GPU: the instances on it, the sum of their estimates and of their reports."""

    instances: tuple[str, ...]
    estimated_mib: float | None
    reported_mib: float | None


def gpu_memory(uuids: Sequence[str], placed: Mapping[str, Sequence[str]],
               estimates: Mapping[str, Mapping[str, float]],
               reported: Mapping[str, MeasuredMemory]) -> dict[str, GpuMemory]:
    """Per GPU UUID (see module doc)."""
    out = {}
    for uuid in uuids:
        on = tuple(sorted(name for name, gpus in placed.items() if uuid in gpus))
        known = [estimates[n][uuid] for n in on if uuid in estimates.get(n, {})]
        said = [mib for n in on if (mib := _reported_on(uuid, placed[n], reported.get(n)))
                is not None]
        out[uuid] = GpuMemory(on, sum(known) if known or not on else None,
                              sum(said) if said or not on else None)
    return out


def _reported_on(uuid: str, cuda_order: Sequence[str],
                 measured: MeasuredMemory | None) -> float | None:
    if measured is None:
        return None
    total = None
    for name, dev in measured.devices.items():
        m = CUDA_DEVICE.match(name)
        if m and int(m.group(1)) < len(cuda_order) and cuda_order[int(m.group(1))] == uuid:
            total = (total or 0.0) + dev.total
    return total
