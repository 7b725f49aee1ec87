"""Checks of the NVIDIA side: the driver's suspend services, video memory preservation,
libnvidia-api (which P-state switching needs) and, per GPU, whether it has P-states to switch.

A box without the NVIDIA driver is a normal CPU-only node: these checks then say so and skip.
"""

from __future__ import annotations

from typing import Final

from inference_node.gpu.inventory import GpuInventory
from shared.doctor import CheckResult, Host, fail, ok, skip, warn

SERVICES_CHECK: Final = "nvidia-suspend"
PRESERVE_CHECK: Final = "nvidia-preserve-vram"
NVAPI_CHECK: Final = "libnvidia-api"
PSTATE_CHECK: Final = "gpu-pstates"

DRIVER_MARKERS: Final = ("/proc/driver/nvidia/version", "/sys/module/nvidia")
PARAMS_FILE: Final = "/proc/driver/nvidia/params"
PRESERVE_PARAM: Final = "PreserveVideoMemoryAllocations"
NVAPI_SONAME: Final = "libnvidia-api.so.1"
# The driver's own units: they save video memory and quiesce the GPU around sleep. Without
# suspend/resume the GPU may not come back; hibernate matters only to hibernation.
REQUIRED_UNITS: Final = ("nvidia-suspend.service", "nvidia-resume.service")
OPTIONAL_UNITS: Final = ("nvidia-hibernate.service",)
NO_DRIVER: Final = "no NVIDIA driver loaded: CPU-only node"


def driver_loaded(host: Host) -> bool:
    return any(host.exists(marker) for marker in DRIVER_MARKERS)


def check_nvidia_services(host: Host) -> CheckResult:
    """Whether the driver's suspend/resume/hibernate units are enabled."""
    if not driver_loaded(host):
        return skip(SERVICES_CHECK, NO_DRIVER)
    states: dict[str, str] = {}
    for unit in REQUIRED_UNITS + OPTIONAL_UNITS:
        done = host.run(["systemctl", "is-enabled", unit])
        if done is None:
            return warn(SERVICES_CHECK, "systemctl is not installed: cannot check "
                        f"{', '.join(REQUIRED_UNITS)}", "run the doctor on a systemd host")
        states[unit] = done.stdout.strip() or "not installed"
    shown = ", ".join(f"{u.removesuffix('.service')} {s}" for u, s in states.items())
    off = [u for u in REQUIRED_UNITS + OPTIONAL_UNITS if states[u] != "enabled"]
    fix = f"`systemctl enable {' '.join(off)}` (they ship with the NVIDIA driver package)"
    if any(u in REQUIRED_UNITS for u in off):
        return fail(SERVICES_CHECK, shown, fix)
    if off:
        return warn(SERVICES_CHECK, shown, fix)
    return ok(SERVICES_CHECK, shown)


def check_preserve_vram(host: Host) -> CheckResult:
    """Whether the driver saves video memory across sleep (``NVreg_PreserveVideoMemoryAllocations``)."""
    if not driver_loaded(host):
        return skip(PRESERVE_CHECK, NO_DRIVER)
    text = host.read_text(PARAMS_FILE)
    value = None
    for line in (text or "").splitlines():
        key, sep, rest = line.partition(":")
        if sep and key.strip() == PRESERVE_PARAM:
            value = rest.strip()
    fix = ("`echo 'options nvidia NVreg_PreserveVideoMemoryAllocations=1 "
           "NVreg_TemporaryFilePath=/var/tmp' > /etc/modprobe.d/nvidia-power.conf`, rebuild the "
           "initramfs, reboot")
    if value is None:
        return warn(PRESERVE_CHECK, f"{PRESERVE_PARAM} not found in {PARAMS_FILE}", fix)
    if value == "1":
        return ok(PRESERVE_CHECK, f"{PRESERVE_PARAM}: 1")
    return warn(PRESERVE_CHECK, f"{PRESERVE_PARAM}: {value}: the nvidia-suspend services expect 1; "
                "without it a display on this GPU may not survive resume", fix)


def check_nvapi(host: Host) -> CheckResult:
    """Whether libnvidia-api loads: without it every P-state switch is a silent no-op."""
    problem = host.load_library(NVAPI_SONAME)
    if problem is None:
        return ok(NVAPI_CHECK, f"{NVAPI_SONAME} loads")
    if not driver_loaded(host):
        return skip(NVAPI_CHECK, f"{NO_DRIVER}; no P-states to switch")
    return warn(NVAPI_CHECK, f"{NVAPI_SONAME} does not load ({problem}): P-states will not switch",
                "install the driver's NVAPI library (Debian/Ubuntu: libnvidia-api1 or the full "
                "nvidia-driver package of the same version), or set pstate.enabled = false")


def check_gpu_pstates(host: Host, inventory: GpuInventory) -> list[CheckResult]:
    """One result per GPU: whether it has more than one memory clock (P-states to switch)."""
    if inventory.problem is not None:
        if driver_loaded(host):
            return [fail(PSTATE_CHECK, f"the NVIDIA driver is loaded but NVML fails: "
                         f"{inventory.problem}", "check `nvidia-smi`; reinstall or reload the "
                         "driver so that its libnvidia-ml matches the kernel module")]
        return [skip(PSTATE_CHECK, f"CPU-only: {inventory.problem}")]
    gpus = inventory.snapshot()
    if not gpus:
        return [skip(PSTATE_CHECK, "CPU-only: NVML lists no GPU")]
    results = []
    for gpu in gpus:
        name = f"gpu{gpu.index}-pstates"
        where = f"{gpu.name} ({gpu.pci_bus_id})"
        now = "" if gpu.pstate is None else f", P{gpu.pstate} now"
        if gpu.pstate_switchable is None:
            results.append(warn(name, f"{where}: NVML cannot list its memory clocks",
                                "update the NVIDIA driver; until then P-states are left alone"))
        elif gpu.pstate_switchable:
            results.append(ok(name, f"{where}: {gpu.memory_clocks} memory clocks{now}"))
        else:
            results.append(skip(name, f"{where}: one memory clock only: no P-states to switch; "
                                f"it saves power only when the box sleeps{now}"))
    return results
