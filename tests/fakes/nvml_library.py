"""A fake NVML library: ``pynvml``'s device functions answered from a ``FakeRig``.

``install(monkeypatch, rig)`` replaces the functions ``NvmlInventory`` calls, so the real
inventory code (v2 memory, mW → W, NOT_SUPPORTED → None, P-state 32 → unknown) runs against
readings a test chooses. Quirks per NVML index: ``unsupported`` (functions that answer
NOT_SUPPORTED), ``lost`` (every call raises GPU_IS_LOST), ``no_v2_memory``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml
import pytest

from tests.fakes.gpu import FakeGpu, FakeRig

MIB = 1024 * 1024


@dataclass
class Readings:
    total_mib: int = 24576
    used_mib: int = 500
    reserved_mib: int = 300  # the v1 API counts this as used, v2 does not
    utilization_pct: int = 37
    temperature_c: int = 41
    power_mw: int = 9500
    pstate: int | None = None  # None: the rig GPU's current state
    unsupported: set[str] = field(default_factory=set)
    lost: bool = False
    no_v2_memory: bool = False


@dataclass
class FakeNvmlLibrary:
    rig: FakeRig
    readings: dict[int, Readings] = field(default_factory=dict)
    init_error: int | None = None
    shutdowns: int = 0

    def reading(self, index: int) -> Readings:
        return self.readings.setdefault(index, Readings())

    def _gpu(self, handle: Any) -> tuple[int, FakeGpu, Readings]:
        index: int = handle.index
        r = self.reading(index)
        if r.lost:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        return index, self.rig.gpus[index], r

    def _check(self, r: Readings, name: str) -> None:
        if name in r.unsupported:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        def init() -> None:
            if self.init_error is not None:
                raise pynvml.NVMLError(self.init_error)

        def shutdown() -> None:
            self.shutdowns += 1

        def by_uuid(uuid: str | bytes) -> Any:
            text = uuid.decode() if isinstance(uuid, bytes) else uuid
            for i, gpu in enumerate(self.rig.gpus):
                if gpu.uuid == text:
                    return SimpleNamespace(index=i)
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)

        def pci(handle: Any) -> Any:
            _, gpu, _ = self._gpu(handle)
            domain, rest = gpu.pci_bus_id.split(":", 1)
            return SimpleNamespace(busId=f"0000{domain.upper()}:{rest.upper()}".encode())

        def memory(handle: Any, version: int | None = None) -> Any:
            _, _, r = self._gpu(handle)
            if version and r.no_v2_memory:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
            used = r.used_mib if version else r.used_mib + r.reserved_mib
            free = r.total_mib - r.used_mib - r.reserved_mib
            return SimpleNamespace(total=r.total_mib * MIB, used=used * MIB, free=free * MIB)

        def utilization(handle: Any) -> Any:
            _, _, r = self._gpu(handle)
            self._check(r, "utilization")
            return SimpleNamespace(gpu=r.utilization_pct, memory=5)

        def power(handle: Any) -> int:
            _, _, r = self._gpu(handle)
            self._check(r, "power")
            return r.power_mw

        def temperature(handle: Any, sensor: int) -> int:
            _, _, r = self._gpu(handle)
            self._check(r, "temperature")
            return r.temperature_c

        def pstate(handle: Any) -> int:
            _, gpu, r = self._gpu(handle)
            self._check(r, "pstate")
            return gpu.pstate if r.pstate is None else r.pstate

        def clocks(handle: Any) -> list[int]:
            _, gpu, r = self._gpu(handle)
            self._check(r, "clocks")
            return [3615, 405][:gpu.memory_clocks]

        def processes(handle: Any) -> list[Any]:
            _, gpu, _ = self._gpu(handle)
            return [SimpleNamespace(pid=pid, usedGpuMemory=1000 * MIB) for pid in gpu.processes]

        def uuid(handle: Any) -> str:
            return self._gpu(handle)[1].uuid

        def name(handle: Any) -> str:
            return self._gpu(handle)[1].name

        fakes = {
            "nvmlInit": init, "nvmlShutdown": shutdown,
            "nvmlDeviceGetCount": lambda: len(self.rig.gpus),
            "nvmlDeviceGetHandleByIndex": lambda i: SimpleNamespace(index=i),
            "nvmlDeviceGetHandleByUUID": by_uuid, "nvmlDeviceGetPciInfo": pci,
            "nvmlDeviceGetUUID": uuid, "nvmlDeviceGetName": name,
            "nvmlDeviceGetMemoryInfo": memory, "nvmlDeviceGetUtilizationRates": utilization,
            "nvmlDeviceGetPowerUsage": power, "nvmlDeviceGetTemperature": temperature,
            "nvmlDeviceGetPerformanceState": pstate,
            "nvmlDeviceGetSupportedMemoryClocks": clocks,
            "nvmlDeviceGetComputeRunningProcesses": processes,
        }
        for attr, fake in fakes.items():
            monkeypatch.setattr(pynvml, attr, fake)
