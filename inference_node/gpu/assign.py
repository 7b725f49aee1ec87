"""Which GPUs an instance runs on, from its environment, checked against NVML.

CUDA numbers GPUs by ``CUDA_DEVICE_ORDER``: ``PCI_BUS_ID`` sorts them by PCI bus id, while the
default ``FASTEST_FIRST`` uses an order nobody outside CUDA can reproduce. The agent gives its
children ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` so that an index in ``CUDA_VISIBLE_DEVICES`` names one
known GPU; UUIDs (``GPU-8f2c...``, any unique prefix, as CUDA accepts) work in every order.

Like CUDA, parsing stops at the first entry that names no GPU. NVML's list of compute processes
(which GPU each pid has a context on) is a second opinion: ``check_processes`` reports where the
two disagree.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from inference_node.gpu.inventory import GpuInfo, pci_sort_key

CUDA_VISIBLE_DEVICES: Final = "CUDA_VISIBLE_DEVICES"
CUDA_DEVICE_ORDER: Final = "CUDA_DEVICE_ORDER"
PCI_BUS_ID_ORDER: Final = "PCI_BUS_ID"


@dataclass(frozen=True)
class GpuAssignment:
    """The GPUs (UUIDs, in CUDA's order for the instance) and any doubt about them."""

    gpus: tuple[str, ...]
    source: str
    problems: tuple[str, ...] = ()


def cuda_order(gpus: Sequence[GpuInfo]) -> list[GpuInfo]:
    """The GPUs as CUDA numbers them with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``."""
    return sorted(gpus, key=lambda g: pci_sort_key(g.pci_bus_id))


def gpus_for_env(env: Mapping[str, str], gpus: Sequence[GpuInfo]) -> GpuAssignment:
    """The GPUs a child with environment ``env`` can use, in its CUDA device order."""
    ordered = cuda_order(gpus)
    visible = env.get(CUDA_VISIBLE_DEVICES)
    order = env.get(CUDA_DEVICE_ORDER, "FASTEST_FIRST")
    if visible is None:
        problems: tuple[str, ...] = ()
        if len(gpus) > 1:
            problems = (f"{CUDA_VISIBLE_DEVICES} is not set, so the instance may use every GPU; "
                        "set gpus = [...] for it",)
        return GpuAssignment(tuple(g.uuid for g in ordered), "all GPUs (no CUDA_VISIBLE_DEVICES)",
                             problems)
    chosen: list[str] = []
    issues: list[str] = []
    used_index = False
    for raw in visible.split(","):
        entry = raw.strip()
        gpu, problem = _resolve(entry, ordered)
        if gpu is None:
            issues.append(f"{CUDA_VISIBLE_DEVICES}={visible}: {problem}; CUDA ignores it and "
                          "every entry after it")
            break
        used_index = used_index or not entry.upper().startswith("GPU-")
        if gpu.uuid in chosen:
            issues.append(f"{CUDA_VISIBLE_DEVICES}={visible}: {entry!r} repeats a GPU")
            break
        chosen.append(gpu.uuid)
    if used_index and order.upper() != PCI_BUS_ID_ORDER and len(gpus) > 1:
        issues.append(f"{CUDA_VISIBLE_DEVICES} uses indices but {CUDA_DEVICE_ORDER}={order}: CUDA "
                      f"may number GPUs differently; set {CUDA_DEVICE_ORDER}={PCI_BUS_ID_ORDER} "
                      "or use UUIDs")
    return GpuAssignment(tuple(chosen), f"{CUDA_VISIBLE_DEVICES}={visible}", tuple(issues))


def _resolve(entry: str, ordered: Sequence[GpuInfo]) -> tuple[GpuInfo | None, str]:
    if not entry:
        return None, "empty entry"
    if entry.lstrip("-").isdigit():
        index = int(entry)
        if 0 <= index < len(ordered):
            return ordered[index], ""
        return None, f"index {index} is not a GPU (there are {len(ordered)})"
    if entry.upper().startswith("MIG-"):
        return None, f"{entry!r} is a MIG instance; P-states apply to whole GPUs only"
    if entry.upper().startswith("GPU-"):
        matches = [g for g in ordered if g.uuid.lower().startswith(entry.lower())]
        if len(matches) == 1:
            return matches[0], ""
        if not matches:
            return None, f"no GPU has UUID {entry}"
        return None, f"UUID prefix {entry} matches {len(matches)} GPUs"
    return None, f"{entry!r} is neither an index nor a GPU UUID"


def env_for_gpus(selection: Iterable[int | str], gpus: Sequence[GpuInfo]) -> dict[str, str]:
    """The environment that confines a child to ``selection`` (config ``gpus = [...]``).

    Indices mean CUDA's PCI_BUS_ID order (which is the order ``node-agent status`` lists);
    UUIDs pass through unchanged.
    """
    return {CUDA_DEVICE_ORDER: PCI_BUS_ID_ORDER,
            CUDA_VISIBLE_DEVICES: ",".join(str(item) for item in selection)}


def check_processes(assignment: GpuAssignment, pids: Iterable[int],
                    gpus: Sequence[GpuInfo]) -> list[str]:
    """Where NVML's compute processes disagree with ``assignment`` for the instance's ``pids``.

    A GPU that runs one of the pids but is not assigned means P-states would switch the wrong
    GPU. An assigned GPU without the pid is normal (CPU-only layers, not loaded yet) and not
    reported.
    """
    wanted = set(pids)
    assigned = set(assignment.gpus)
    problems: list[str] = []
    for gpu in gpus:
        running = sorted(p.pid for p in gpu.processes if p.pid in wanted)
        if running and gpu.uuid not in assigned:
            problems.append(f"pid {running[0]} runs on GPU {gpu.pci_bus_id} ({gpu.uuid}), "
                            f"which {assignment.source} does not name")
    return problems
