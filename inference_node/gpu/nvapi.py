"""P-states through NVIDIA's NVAPI (``libnvidia-api.so.1``), the way nvidia-pstate does it.

nvidia-pstate loads the same library, gets functions by id through ``nvapi_QueryInterface``
and calls ``NvAPI_GPU_SetForcePstate(handle, pstate, 2)``. But it indexes GPUs in NVAPI's
enumeration order (which differs from NVML's and CUDA's on mixed rigs), prints instead of
raising, and turns into a silent no-op when the library is missing; its ``nvapi`` module,
which only binds the calls, loads the library on import (so it cannot be handed another one)
and calls each function pointer without checking it is there (a NULL one is a segfault, not an
error). So llamanap does not depend on it and talks to NVAPI itself: every function pointer is
checked before use, every return code is turned into an error with NVAPI's own message, and
each NVML GPU is matched to its NVAPI handle by PCI bus number (``NvAPI_GPU_GetBusId``).
Whether a switch took is the controller's business: it reads the P-state back through NVML.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Final

from inference_node.errors import NvapiCallError, PstateBackendUnavailable, PstateError
from inference_node.gpu.inventory import GpuInfo, pci_bus_number

log = logging.getLogger(__name__)

LIBRARY_NAMES: Final = ("libnvidia-api.so.1", "libnvidia-api.so")
MAX_PHYSICAL_GPUS: Final = 64  # NVAPI_MAX_PHYSICAL_GPUS
SHORT_STRING_CHARS: Final = 64  # NvAPI_ShortString
# With pstate 16 the driver chooses, falling back to low unless work needs more (nvidia-pstate
# passes the same value).
FALLBACK_LOW: Final = 2
NVAPI_OK: Final = 0
NVAPI_HANDLE_INVALIDATED: Final = -10

# Function ids for nvapi_QueryInterface (public in NVAPI's SDK headers and in nvidia-pstate).
ID_INITIALIZE: Final = 0x0150E828
ID_UNLOAD: Final = 0xD22BDD7E
ID_GET_ERROR_MESSAGE: Final = 0x6C2D048C
ID_ENUM_PHYSICAL_GPUS: Final = 0xE5AC921F
ID_GPU_GET_BUS_ID: Final = 0x1BE0B8E5
ID_GPU_SET_FORCE_PSTATE: Final = 0x025BFB10

_HandleArray = ctypes.c_void_p * MAX_PHYSICAL_GPUS
Loader = Callable[[str], Any]


class _Nvapi:
    """Typed NVAPI entry points; each call checks its return code."""

    def __init__(self, lib: Any) -> None:
        try:
            query = lib.nvapi_QueryInterface
        except AttributeError as exc:
            raise PstateBackendUnavailable(
                "libnvidia-api has no nvapi_QueryInterface; not an NVAPI library") from exc
        query.argtypes = [ctypes.c_uint32]
        query.restype = ctypes.c_void_p
        self._query = query
        self._initialize = self._fn(ID_INITIALIZE, "NvAPI_Initialize")
        self._unload = self._fn(ID_UNLOAD, "NvAPI_Unload")
        self._error_message = self._fn(ID_GET_ERROR_MESSAGE, "NvAPI_GetErrorMessage",
                                       ctypes.c_int, ctypes.c_char_p)
        self._enum = self._fn(ID_ENUM_PHYSICAL_GPUS, "NvAPI_EnumPhysicalGPUs",
                              ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32))
        self._bus_id = self._fn(ID_GPU_GET_BUS_ID, "NvAPI_GPU_GetBusId",
                                ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32))
        self._force = self._fn(ID_GPU_SET_FORCE_PSTATE, "NvAPI_GPU_SetForcePstate",
                               ctypes.c_void_p, ctypes.c_int, ctypes.c_int)

    def _fn(self, fid: int, name: str, *argtypes: Any) -> Any:
        address = self._query(fid)
        if not address:
            raise PstateBackendUnavailable(f"this driver's NVAPI has no {name} (id {fid:#010x})")
        return ctypes.CFUNCTYPE(ctypes.c_int, *argtypes)(address)

    def message(self, code: int) -> str:
        buffer = ctypes.create_string_buffer(SHORT_STRING_CHARS)
        if self._error_message(code, buffer) != NVAPI_OK:
            return "no message"
        return buffer.value.decode(errors="replace") or "no message"

    def check(self, code: int, call: str) -> None:
        if code != NVAPI_OK:
            raise NvapiCallError(call, code, self.message(code))

    def initialize(self) -> None:
        self.check(self._initialize(), "NvAPI_Initialize")

    def unload(self) -> None:
        self.check(self._unload(), "NvAPI_Unload")

    def physical_gpus(self) -> list[tuple[int, int]]:
        """``[(handle, bus number)]`` in NVAPI's enumeration order."""
        handles = _HandleArray()
        count = ctypes.c_uint32(0)
        self.check(self._enum(handles, ctypes.byref(count)), "NvAPI_EnumPhysicalGPUs")
        found: list[tuple[int, int]] = []
        for i in range(min(count.value, MAX_PHYSICAL_GPUS)):
            handle = handles[i]
            if handle is None:
                continue
            bus = ctypes.c_uint32(0)
            self.check(self._bus_id(handle, ctypes.byref(bus)), f"NvAPI_GPU_GetBusId(#{i})")
            found.append((handle, bus.value))
        return found

    def force_pstate(self, handle: int, pstate: int) -> int:
        return int(self._force(handle, pstate, FALLBACK_LOW))


class NvapiBackend:
    """The real P-state backend. Thread-safe; every call blocks briefly (run it off the loop)."""

    name = "nvapi"

    def __init__(self, library_names: Sequence[str] = LIBRARY_NAMES,
                 loader: Loader = ctypes.CDLL) -> None:
        self._library_names = tuple(library_names)
        self._loader = loader
        self._lock = threading.Lock()
        self._api: _Nvapi | None = None
        self._by_bus: dict[int, int] = {}  # PCI bus number -> NVAPI handle

    def __repr__(self) -> str:
        state = f"{len(self._by_bus)} GPU(s)" if self._api else "closed"
        return f"<NvapiBackend {state}>"

    def open(self, gpus: Sequence[GpuInfo]) -> dict[str, str | None]:
        with self._lock:
            if self._api is None:
                self._api = self._load()
            try:
                self._enumerate()
            except NvapiCallError as exc:
                raise PstateBackendUnavailable(f"NVAPI cannot list GPUs: {exc}") from exc
            buses = Counter(pci_bus_number(g.pci_bus_id) for g in gpus)
            problems: dict[str, str | None] = {}
            for gpu in gpus:
                bus = pci_bus_number(gpu.pci_bus_id)
                if buses[bus] > 1:
                    problems[gpu.uuid] = (f"PCI bus {bus:#04x} holds several GPUs (in different "
                                          "PCI domains); NVAPI reports only the bus, so it "
                                          "cannot tell them apart")
                elif bus not in self._by_bus:
                    problems[gpu.uuid] = f"NVAPI lists no GPU on PCI bus {bus:#04x}"
                else:
                    problems[gpu.uuid] = None
            return problems

    def set_pstate(self, gpu: GpuInfo, pstate: int) -> None:
        bus = pci_bus_number(gpu.pci_bus_id)
        with self._lock:
            api = self._api
            if api is None:
                raise PstateError(f"GPU {gpu.pci_bus_id}: NVAPI is not open")
            handle = self._by_bus.get(bus)
            if handle is None:
                raise PstateError(f"GPU {gpu.pci_bus_id}: NVAPI lists no GPU on bus {bus:#04x}")
            code = api.force_pstate(handle, pstate)
            if code == NVAPI_HANDLE_INVALIDATED:  # the GPU was reset: enumerate again, once
                try:
                    self._enumerate()
                except NvapiCallError as exc:
                    raise PstateError(f"GPU {gpu.pci_bus_id}: handle invalidated and {exc}") from exc
                handle = self._by_bus.get(bus)
                if handle is None:
                    raise PstateError(f"GPU {gpu.pci_bus_id}: gone from NVAPI after a reset")
                code = api.force_pstate(handle, pstate)
            if code != NVAPI_OK:
                raise PstateError(f"GPU {gpu.pci_bus_id}: NvAPI_GPU_SetForcePstate(P{pstate}) "
                                  f"returned {code} ({api.message(code)})")

    def close(self) -> None:
        with self._lock:
            api, self._api = self._api, None
            self._by_bus.clear()
            if api is not None:
                try:
                    api.unload()
                except NvapiCallError as exc:
                    log.warning("%s", exc)

    def _load(self) -> _Nvapi:
        errors: list[str] = []
        for name in self._library_names:
            try:
                lib = self._loader(name)
                break
            except OSError as exc:
                errors.append(str(exc))
        else:
            raise PstateBackendUnavailable(
                f"{self._library_names[0]} not found ({'; '.join(errors) or 'no candidates'}); "
                "install the NVIDIA driver's NVAPI library (Debian: libnvidia-api1) to switch "
                "P-states")
        api = _Nvapi(lib)
        try:
            api.initialize()
        except NvapiCallError as exc:
            raise PstateBackendUnavailable(f"NVAPI does not start: {exc}") from exc
        return api

    def _enumerate(self) -> None:
        assert self._api is not None
        found = self._api.physical_gpus()
        counts = Counter(bus for _, bus in found)
        self._by_bus = {bus: handle for handle, bus in found if counts[bus] == 1}
        log.debug("NVAPI GPUs by bus: %s", sorted(self._by_bus))
