"""Recording fakes for the GPU hardware boundary: NVML (inventory) and NVAPI (the library).

``FakeRig`` holds the GPUs. ``FakeNvml`` is a ``GpuInventory`` over it. ``FakeNvapiLibrary``
stands in for ``libnvidia-api.so.1`` itself: ``nvapi_QueryInterface`` hands out real C function
pointers (ctypes callbacks), so the real ``NvapiBackend`` runs unchanged over it, enumerates
GPUs in the rig's NVAPI order, and every ``NvAPI_GPU_SetForcePstate`` is recorded with the PCI
bus id of the GPU it reached. ``RecordingBackend`` is a plain ``PstateBackend`` for tests that
do not need the library layer.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from inference_node.errors import PstateError
from inference_node.gpu import nvapi
from inference_node.gpu.backend import PSTATE_DRIVER_DECIDES
from inference_node.gpu.inventory import GpuInfo, GpuProcess, pci_bus_number

IDLE_PSTATE = 0  # what a P40 shows with a CUDA context and no forced state
NVAPI_ERROR = -1


@dataclass
class FakeGpu:
    uuid: str
    pci_bus_id: str
    name: str = "Tesla P40"
    memory_clocks: int = 2  # > 1: the GPU has P-states to switch
    pstate: int = IDLE_PSTATE
    sticky: bool = False  # the switch "succeeds" but the P-state never changes
    fail_code: int = 0  # NVAPI code SetForcePstate returns (0: success)
    processes: tuple[int, ...] = ()
    temperature_c: int = 30
    memory_used_mib: float = 576.0


@dataclass(frozen=True)
class Switch:
    """One P-state call that reached a GPU: when (perf_counter), which GPU, which state."""

    t: float
    pci_bus_id: str
    pstate: int


@dataclass
class FakeRig:
    """GPUs listed in NVML order; ``nvapi_order`` lists NVML indices in NVAPI's order."""

    gpus: list[FakeGpu]
    nvapi_order: list[int] = field(default_factory=list)
    switches: list[Switch] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if not self.nvapi_order:
            self.nvapi_order = list(range(len(self.gpus)))

    def by_bus(self, pci_bus_id: str) -> FakeGpu:
        return next(g for g in self.gpus if g.pci_bus_id == pci_bus_id)

    def apply(self, gpu: FakeGpu, pstate: int) -> None:
        with self.lock:
            self.switches.append(Switch(time.perf_counter(), gpu.pci_bus_id, pstate))
            if not gpu.sticky:
                gpu.pstate = IDLE_PSTATE if pstate == PSTATE_DRIVER_DECIDES else pstate

    def switches_of(self, pci_bus_id: str) -> list[int]:
        with self.lock:
            return [s.pstate for s in self.switches if s.pci_bus_id == pci_bus_id]


class FakeNvml:
    """``GpuInventory`` over a ``FakeRig`` (NVML order = the rig's list order)."""

    def __init__(self, rig: FakeRig) -> None:
        self.rig = rig

    @property
    def problem(self) -> str | None:
        return None

    def snapshot(self) -> list[GpuInfo]:
        return [
            GpuInfo(index=i, uuid=g.uuid, pci_bus_id=g.pci_bus_id, name=g.name,
                    memory_total_mib=24576.0, memory_free_mib=24576.0 - g.memory_used_mib,
                    memory_used_mib=g.memory_used_mib, utilization_pct=0,
                    temperature_c=g.temperature_c, power_w=9.5, pstate=g.pstate,
                    memory_clocks=g.memory_clocks,
                    processes=tuple(GpuProcess(pid, 100.0) for pid in g.processes))
            for i, g in enumerate(self.rig.gpus)
        ]

    def performance_state(self, uuid: str) -> int | None:
        return next(g.pstate for g in self.rig.gpus if g.uuid == uuid)


class FakeNvapiLibrary:
    """``libnvidia-api.so.1`` for ``NvapiBackend(loader=...)``: real C callbacks over the rig."""

    HANDLE_BASE = 0x1000

    def __init__(self, rig: FakeRig, *, initialize_code: int = 0) -> None:
        self.rig = rig
        self.initialize_code = initialize_code
        self.calls: list[str] = []
        self._callbacks: dict[int, Any] = {}  # keeps the C thunks alive
        int_fn = ctypes.CFUNCTYPE(ctypes.c_int)
        ptr_fn = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32))
        self._register(nvapi.ID_INITIALIZE, int_fn(self._initialize))
        self._register(nvapi.ID_UNLOAD, int_fn(lambda: 0))
        self._register(nvapi.ID_GET_ERROR_MESSAGE,
                       ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p)(self._message))
        self._register(nvapi.ID_ENUM_PHYSICAL_GPUS, ptr_fn(self._enum))
        self._register(nvapi.ID_GPU_GET_BUS_ID, ptr_fn(self._bus_id))
        self._register(nvapi.ID_GPU_SET_FORCE_PSTATE, ctypes.CFUNCTYPE(
            ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int)(self._force))
        self.nvapi_QueryInterface = _Query(self._callbacks)

    def _register(self, fid: int, thunk: Any) -> None:
        self._callbacks[fid] = thunk

    def _handle(self, position: int) -> int:
        return self.HANDLE_BASE * (position + 1)

    def _gpu(self, handle: int | None) -> FakeGpu | None:
        for position, index in enumerate(self.rig.nvapi_order):
            if handle == self._handle(position):
                return self.rig.gpus[index]
        return None

    def _initialize(self) -> int:
        self.calls.append("initialize")
        return self.initialize_code

    def _message(self, code: int, buffer: int) -> int:
        text = f"fake NVAPI error {code}".encode()[:63] + b"\0"
        ctypes.memmove(buffer, text, len(text))
        return 0

    def _enum(self, handles: int, count: Any) -> int:
        array = ctypes.cast(handles, ctypes.POINTER(ctypes.c_void_p))
        for position in range(len(self.rig.nvapi_order)):
            array[position] = self._handle(position)
        count[0] = len(self.rig.nvapi_order)
        return 0

    def _bus_id(self, handle: int, bus: Any) -> int:
        gpu = self._gpu(handle)
        if gpu is None:
            return NVAPI_ERROR
        bus[0] = pci_bus_number(gpu.pci_bus_id)
        return 0

    def _force(self, handle: int, pstate: int, fallback: int) -> int:
        gpu = self._gpu(handle)
        if gpu is None:
            return NVAPI_ERROR
        self.calls.append(f"force {gpu.pci_bus_id} P{pstate} fallback={fallback}")
        if gpu.fail_code:
            return gpu.fail_code
        self.rig.apply(gpu, pstate)
        return 0


class _Query:
    """``nvapi_QueryInterface``: accepts ctypes' argtypes/restype and returns addresses."""

    argtypes: Any = None
    restype: Any = None

    def __init__(self, callbacks: dict[int, Any]) -> None:
        self._callbacks = callbacks

    def __call__(self, fid: int) -> int | None:
        thunk = self._callbacks.get(fid)
        return None if thunk is None else ctypes.cast(thunk, ctypes.c_void_p).value


class RecordingBackend:
    """``PstateBackend`` that switches the rig's GPUs directly and records every call."""

    name = "recording"

    def __init__(self, rig: FakeRig) -> None:
        self.rig = rig
        self.closed = False

    def open(self, gpus: Sequence[GpuInfo]) -> dict[str, str | None]:
        return {g.uuid: None for g in gpus}

    def set_pstate(self, gpu: GpuInfo, pstate: int) -> None:
        fake = self.rig.by_bus(gpu.pci_bus_id)
        if fake.fail_code:
            raise PstateError(f"GPU {gpu.pci_bus_id}: refused with {fake.fail_code}")
        self.rig.apply(fake, pstate)

    def close(self) -> None:
        self.closed = True


def three_gpu_rig() -> FakeRig:
    """Three P40s whose NVML, CUDA (PCI bus) and NVAPI orders all differ.

    NVML order: bus 0x41, 0x01, 0x81. CUDA (PCI_BUS_ID) order: 0x01, 0x41, 0x81.
    NVAPI order: 0x81, 0x01, 0x41.
    """
    gpus = [
        FakeGpu("GPU-41414141-0000-0000-0000-000000000041", "0000:41:00.0"),
        FakeGpu("GPU-01010101-0000-0000-0000-000000000001", "0000:01:00.0"),
        FakeGpu("GPU-81818181-0000-0000-0000-000000000081", "0000:81:00.0"),
    ]
    return FakeRig(gpus, nvapi_order=[2, 1, 0])


class OverlapDetectingBackend(RecordingBackend):
    """``RecordingBackend`` that counts calls made while another call was still running.

    Each call takes a lock without blocking and holds it for ``hold_s`` (a real driver call
    takes time too), so two threads switching at once are caught, not just unlikely."""

    name = "overlap-detecting"

    def __init__(self, rig: FakeRig, *, hold_s: float = 0.005) -> None:
        super().__init__(rig)
        self.hold_s = hold_s
        self.calls = 0
        self.overlaps = 0
        self._busy = threading.Lock()

    def set_pstate(self, gpu: GpuInfo, pstate: int) -> None:
        if not self._busy.acquire(blocking=False):
            with self.rig.lock:
                self.overlaps += 1
            return
        try:
            self.calls += 1
            time.sleep(self.hold_s)
            super().set_pstate(gpu, pstate)
        finally:
            self._busy.release()
