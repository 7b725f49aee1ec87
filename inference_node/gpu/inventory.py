"""The GPU inventory: what GPUs this box has and how they are doing.

GPUs are keyed by UUID everywhere (and carry their PCI bus id, which is how NVAPI finds
them). The real inventory is ``inference_node.gpu.nvml.NvmlInventory``; tests use a fake
behind the ``GpuInventory`` protocol. A box without NVML (no driver, no GPU) is a normal
CPU-only mode: ``open_inventory()`` then returns ``NoGpus`` with the reason, logged once.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    used_mib: float | None


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as NVML sees it at one moment. Fields NVML cannot read on this GPU are None."""

    index: int  # NVML's index: not CUDA's, not NVAPI's
    uuid: str
    pci_bus_id: str  # normalized, e.g. "0000:01:00.0"
    name: str
    memory_total_mib: float | None = None
    memory_free_mib: float | None = None
    memory_used_mib: float | None = None
    utilization_pct: int | None = None
    temperature_c: int | None = None
    power_w: float | None = None
    pstate: int | None = None  # 0..15; None when unknown
    memory_clocks: int | None = None  # supported memory clocks; <= 1 means one P-state only
    processes: tuple[GpuProcess, ...] = field(default_factory=tuple)

    @property
    def pstate_switchable(self) -> bool | None:
        """Whether the GPU has P-states to switch between (None: NVML cannot tell)."""
        return None if self.memory_clocks is None else self.memory_clocks > 1

    def status(self) -> dict[str, Any]:
        return {
            "index": self.index, "uuid": self.uuid, "pci_bus_id": self.pci_bus_id,
            "name": self.name, "memory_total_mib": self.memory_total_mib,
            "memory_free_mib": self.memory_free_mib, "memory_used_mib": self.memory_used_mib,
            "utilization_pct": self.utilization_pct, "temperature_c": self.temperature_c,
            "power_w": self.power_w, "pstate": self.pstate,
            "pstate_switchable": self.pstate_switchable,
            "processes": [{"pid": p.pid, "used_mib": p.used_mib} for p in self.processes],
        }


class GpuInventory(Protocol):
    """Read-only view of the GPUs. Calls may block briefly (run them off the event loop)."""

    @property
    def problem(self) -> str | None:
        """Why there are no GPUs to manage (CPU-only mode), or None."""
        ...

    def snapshot(self) -> list[GpuInfo]:
        """Every GPU, in NVML order, with fresh readings; [] in CPU-only mode."""
        ...

    def performance_state(self, uuid: str) -> int | None:
        """The current P-state of one GPU (0..15), or None when NVML cannot tell."""
        ...


class NoGpus:
    """CPU-only mode: no NVML, no driver, or no GPU. Says why, and nothing else."""

    def __init__(self, reason: str) -> None:
        self._reason = reason

    @property
    def problem(self) -> str | None:
        return self._reason

    def snapshot(self) -> list[GpuInfo]:
        return []

    def performance_state(self, uuid: str) -> int | None:
        return None

    def __repr__(self) -> str:
        return f"<NoGpus {self._reason!r}>"


def open_inventory() -> GpuInventory:
    """The NVML inventory, or ``NoGpus`` (logged once, at info level) when NVML is unusable."""
    from inference_node.errors import NvmlUnavailable
    from inference_node.gpu.nvml import NvmlInventory

    try:
        return NvmlInventory.open()
    except NvmlUnavailable as exc:
        log.info("no GPUs to manage, running CPU-only: %s", exc)
        return NoGpus(str(exc))


_PCI = re.compile(r"^(?:([0-9a-fA-F]{1,8}):)?([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})\.([0-7])$")


def normalize_pci_bus_id(text: str) -> str:
    """``00000000:01:00.0`` (NVML), ``0000:01:00.0`` (sysfs, CUDA) or ``01:00.0`` → ``0000:01:00.0``.

    Raises ValueError for anything else.
    """
    m = _PCI.match(text.strip())
    if not m:
        raise ValueError(f"not a PCI bus id: {text!r}")
    domain = int(m[1] or "0", 16)
    return f"{domain:04x}:{int(m[2], 16):02x}:{int(m[3], 16):02x}.{int(m[4], 16)}"


def pci_sort_key(pci_bus_id: str) -> tuple[int, int, int, int]:
    """(domain, bus, device, function) of a normalized PCI bus id: CUDA's PCI_BUS_ID order."""
    domain, bus, rest = pci_bus_id.split(":")
    device, function = rest.split(".")
    return int(domain, 16), int(bus, 16), int(device, 16), int(function, 16)


def pci_bus_number(pci_bus_id: str) -> int:
    """The bus number of a normalized PCI bus id (what NVAPI's NvAPI_GPU_GetBusId reports)."""
    return pci_sort_key(pci_bus_id)[1]
