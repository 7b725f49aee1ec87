"""The real NVAPI backend over a fake libnvidia-api (real C callbacks), and the real NVML/NVAPI
loaders on this GPU-less machine."""

from __future__ import annotations

import logging

import pytest

from inference_node.errors import PstateBackendUnavailable, PstateError
from inference_node.gpu.inventory import NoGpus, open_inventory
from inference_node.gpu.nvapi import FALLBACK_LOW, NvapiBackend
from tests.fakes.gpu import FakeNvapiLibrary, FakeNvml, FakeRig, three_gpu_rig


def backend_over(rig: FakeRig, **kwargs: int) -> tuple[NvapiBackend, FakeNvapiLibrary]:
    lib = FakeNvapiLibrary(rig, **kwargs)
    return NvapiBackend(loader=lambda name: lib), lib


def test_each_nvml_gpu_reaches_its_own_nvapi_handle() -> None:
    rig = three_gpu_rig()
    backend, lib = backend_over(rig)
    gpus = FakeNvml(rig).snapshot()
    assert backend.open(gpus) == {g.uuid: None for g in gpus}
    for gpu in gpus:  # NVML order 0x41, 0x01, 0x81; NVAPI enumerates 0x81, 0x01, 0x41
        backend.set_pstate(gpu, 8)
        assert rig.switches[-1].pci_bus_id == gpu.pci_bus_id
        assert rig.by_bus(gpu.pci_bus_id).pstate == 8
    assert lib.calls[0] == "initialize"
    assert all(c.endswith(f"fallback={FALLBACK_LOW}") for c in lib.calls if c.startswith("force"))
    backend.close()
    with pytest.raises(PstateError, match="not open"):
        backend.set_pstate(gpus[0], 16)


def test_an_error_code_from_set_force_pstate_is_raised_with_nvapis_message() -> None:
    rig = three_gpu_rig()
    rig.gpus[1].fail_code = -104
    backend, _ = backend_over(rig)
    gpus = FakeNvml(rig).snapshot()
    backend.open(gpus)
    with pytest.raises(PstateError) as err:
        backend.set_pstate(gpus[1], 8)
    assert "0000:01:00.0" in str(err.value) and "-104" in str(err.value)
    assert "fake NVAPI error -104" in str(err.value)


def test_initialize_failure_makes_the_backend_unavailable() -> None:
    backend, _ = backend_over(three_gpu_rig(), initialize_code=-6)
    with pytest.raises(PstateBackendUnavailable, match="NvAPI_Initialize returned -6"):
        backend.open(FakeNvml(three_gpu_rig()).snapshot())


def test_gpus_nvapi_cannot_tell_apart_or_does_not_list_are_reported() -> None:
    rig = three_gpu_rig()
    rig.nvapi_order = [1, 0]  # NVAPI does not see bus 0x81
    nvml_view = FakeNvml(rig).snapshot()
    backend, _ = backend_over(rig)
    problems = backend.open(nvml_view)
    assert problems[rig.gpus[2].uuid] == "NVAPI lists no GPU on PCI bus 0x81"
    assert problems[rig.gpus[0].uuid] is None
    rig.gpus[2].pci_bus_id = "0001:41:00.0"  # same bus number as 0x41, another PCI domain
    problems = backend.open(FakeNvml(rig).snapshot())
    assert "cannot tell them apart" in str(problems[rig.gpus[0].uuid])


def test_missing_libnvidia_api_is_reported_not_ignored() -> None:
    """This machine has no NVIDIA driver: the real loader must say so (nvidia-pstate no-ops)."""
    with pytest.raises(PstateBackendUnavailable, match=r"libnvidia-api\.so\.1 not found"):
        NvapiBackend().open(FakeNvml(three_gpu_rig()).snapshot())


def test_no_nvml_is_cpu_only_mode_reported_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="inference_node.gpu")
    inventory = open_inventory()
    assert isinstance(inventory, NoGpus)
    assert inventory.problem is not None and "libnvidia-ml.so.1" in inventory.problem
    assert inventory.snapshot() == [] and inventory.snapshot() == []
    assert inventory.performance_state("GPU-x") is None
    assert len([r for r in caplog.records if "CPU-only" in r.getMessage()]) == 1
