"""The GPU inventory through NVML (``pynvml`` from the nvidia-ml-py distribution).

Every reading is optional: a field this GPU or driver does not support (``NOT_SUPPORTED``) is
None, never an error. Memory uses the v2 API (``used`` without the driver's reservation) where
the driver has it. Power comes in milliwatts and is reported in watts.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Final, TypeVar

import pynvml

from inference_node.errors import NvmlUnavailable
from inference_node.gpu.inventory import GpuInfo, GpuProcess, normalize_pci_bus_id

log = logging.getLogger(__name__)

T = TypeVar("T")

MIB: Final = 1024 * 1024
MW_PER_W: Final = 1000.0
# nvmlDeviceGetPerformanceState answers 32 when it cannot tell.
NVML_PSTATE_UNKNOWN: Final = 32
MAX_PSTATE: Final = 15


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _optional(call: Callable[..., T], *args: Any) -> T | None:
    """``call(*args)``, or None where NVML says this GPU does not support it."""
    try:
        return call(*args)
    except pynvml.NVMLError as exc:
        if exc.value not in (pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND,
                             pynvml.NVML_ERROR_NO_PERMISSION):
            log.debug("NVML %s failed: %s", getattr(call, "__name__", call), exc)
        return None


class NvmlInventory:
    """GPUs as NVML sees them. Thread-safe (NVML is); calls block for milliseconds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._closed = False
        self._warned: set[str] = set()

    @classmethod
    def open(cls) -> NvmlInventory:
        """Initialize NVML; raises NvmlUnavailable with the reason (no driver, no GPU...)."""
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise NvmlUnavailable(_init_problem(exc)) from exc
        try:
            count = pynvml.nvmlDeviceGetCount()
        except pynvml.NVMLError as exc:
            pynvml.nvmlShutdown()
            raise NvmlUnavailable(f"NVML cannot count GPUs: {exc}") from exc
        if count == 0:
            pynvml.nvmlShutdown()
            raise NvmlUnavailable("NVML found no NVIDIA GPU")
        return cls()

    @property
    def problem(self) -> str | None:
        return "NVML was shut down" if self._closed else None

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                pynvml.nvmlShutdown()

    def snapshot(self) -> list[GpuInfo]:
        if self._closed:
            return []
        gpus: list[GpuInfo] = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            try:
                gpus.append(self._read(index))
            except pynvml.NVMLError as exc:  # a GPU fell off the bus: report the rest
                key = f"{index}:{exc.value}"
                if key not in self._warned:
                    self._warned.add(key)
                    log.warning("NVML cannot read GPU %d: %s", index, exc)
        return gpus

    def performance_state(self, uuid: str) -> int | None:
        if self._closed:
            return None
        try:
            handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
        except pynvml.NVMLError:
            return None
        return _pstate(handle)

    def _read(self, index: int) -> GpuInfo:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        pci = pynvml.nvmlDeviceGetPciInfo(handle)
        memory = _memory(handle)
        util = _optional(pynvml.nvmlDeviceGetUtilizationRates, handle)
        power_mw = _optional(pynvml.nvmlDeviceGetPowerUsage, handle)
        clocks = _optional(pynvml.nvmlDeviceGetSupportedMemoryClocks, handle)
        processes = _optional(pynvml.nvmlDeviceGetComputeRunningProcesses, handle) or []
        return GpuInfo(
            index=index,
            uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
            pci_bus_id=normalize_pci_bus_id(_text(pci.busId)),
            name=_text(pynvml.nvmlDeviceGetName(handle)),
            memory_total_mib=None if memory is None else memory[0],
            memory_free_mib=None if memory is None else memory[1],
            memory_used_mib=None if memory is None else memory[2],
            utilization_pct=None if util is None else int(util.gpu),
            temperature_c=_optional(pynvml.nvmlDeviceGetTemperature, handle,
                                    pynvml.NVML_TEMPERATURE_GPU),
            power_w=None if power_mw is None else power_mw / MW_PER_W,
            pstate=_pstate(handle),
            memory_clocks=None if clocks is None else len(clocks),
            processes=tuple(
                GpuProcess(int(p.pid), None if p.usedGpuMemory is None else p.usedGpuMemory / MIB)
                for p in processes
            ),
        )


def _memory(handle: Any) -> tuple[float, float, float] | None:
    info = _optional(pynvml.nvmlDeviceGetMemoryInfo, handle, pynvml.nvmlMemory_v2)
    if info is None:  # drivers before the v2 call
        info = _optional(pynvml.nvmlDeviceGetMemoryInfo, handle)
    if info is None:
        return None
    return info.total / MIB, info.free / MIB, info.used / MIB


def _pstate(handle: Any) -> int | None:
    value = _optional(pynvml.nvmlDeviceGetPerformanceState, handle)
    if value is None or value == NVML_PSTATE_UNKNOWN or not 0 <= value <= MAX_PSTATE:
        return None
    return int(value)


def _init_problem(exc: pynvml.NVMLError) -> str:
    if isinstance(exc, pynvml.NVMLError_LibraryNotFound):
        return "libnvidia-ml.so.1 not found (no NVIDIA driver installed)"
    if isinstance(exc, pynvml.NVMLError_DriverNotLoaded):
        return "the NVIDIA kernel driver is not loaded"
    if isinstance(exc, pynvml.NVMLError_NoPermission):
        return "no permission to use NVML; run the agent as a user that can open /dev/nvidia*"
    return f"NVML does not start: {exc}"
