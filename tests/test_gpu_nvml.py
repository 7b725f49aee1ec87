"""The real NVML inventory code over a fake NVML library (no GPU on this machine)."""

from __future__ import annotations

import logging

import pynvml
import pytest

from inference_node.gpu.inventory import NoGpus, open_inventory
from inference_node.gpu.nvml import NvmlInventory
from tests.fakes.gpu import FakeRig, three_gpu_rig
from tests.fakes.nvml_library import FakeNvmlLibrary


def library(monkeypatch: pytest.MonkeyPatch, rig: FakeRig | None = None) -> FakeNvmlLibrary:
    fake = FakeNvmlLibrary(rig or three_gpu_rig())
    fake.install(monkeypatch)
    return fake


def test_readings_are_converted_and_keyed_by_uuid_and_pci(monkeypatch: pytest.MonkeyPatch) -> None:
    rig = three_gpu_rig()
    rig.gpus[1].processes = (4242,)
    rig.gpus[2].memory_clocks = 1
    library(monkeypatch, rig)
    inventory = open_inventory()
    assert isinstance(inventory, NvmlInventory) and inventory.problem is None
    gpus = inventory.snapshot()
    assert [g.pci_bus_id for g in gpus] == ["0000:41:00.0", "0000:01:00.0", "0000:81:00.0"]
    first = gpus[0]
    assert first.uuid == rig.gpus[0].uuid and first.name == "Tesla P40" and first.index == 0
    # v2 memory: "used" without the driver's reservation.
    assert (first.memory_total_mib, first.memory_used_mib, first.memory_free_mib) == \
        (24576.0, 500.0, 23776.0)
    assert first.power_w == 9.5 and first.utilization_pct == 37 and first.temperature_c == 41
    assert first.pstate == 0 and first.pstate_switchable is True
    assert [(p.pid, p.used_mib) for p in gpus[1].processes] == [(4242, 1000.0)]
    assert gpus[2].pstate_switchable is False
    rig.gpus[0].pstate = 8
    assert inventory.performance_state(rig.gpus[0].uuid) == 8
    assert inventory.performance_state("GPU-nope") is None


def test_unsupported_readings_are_none_not_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = library(monkeypatch)
    fake.reading(0).unsupported = {"utilization", "power", "temperature", "clocks"}
    fake.reading(1).pstate = 32  # NVML_PSTATE_UNKNOWN
    fake.reading(2).no_v2_memory = True  # an old driver: v1 counts the reservation as used
    gpus = NvmlInventory.open().snapshot()
    g0 = gpus[0]
    assert (g0.utilization_pct, g0.power_w, g0.temperature_c, g0.memory_clocks) == \
        (None, None, None, None)
    assert g0.pstate_switchable is None
    assert gpus[1].pstate is None
    assert gpus[2].memory_used_mib == 800.0


def test_a_lost_gpu_is_skipped_and_warned_once(monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    fake = library(monkeypatch)
    fake.reading(1).lost = True
    inventory = NvmlInventory.open()
    caplog.set_level(logging.WARNING, logger="inference_node.gpu.nvml")
    assert len(inventory.snapshot()) == 2 and len(inventory.snapshot()) == 2
    assert len([r for r in caplog.records if "cannot read GPU 1" in r.getMessage()]) == 1
    inventory.close()
    assert fake.shutdowns == 1 and inventory.snapshot() == []


@pytest.mark.parametrize(("error", "reason"), [
    (pynvml.NVML_ERROR_DRIVER_NOT_LOADED, "kernel driver is not loaded"),
    (pynvml.NVML_ERROR_NO_PERMISSION, "no permission"),
    (pynvml.NVML_ERROR_UNKNOWN, "NVML does not start"),
])
def test_nvml_that_does_not_start_means_cpu_only(monkeypatch: pytest.MonkeyPatch, error: int,
                                                  reason: str) -> None:
    library(monkeypatch).init_error = error
    inventory = open_inventory()
    assert isinstance(inventory, NoGpus) and reason in str(inventory.problem)


def test_no_gpu_at_all_means_cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = library(monkeypatch, FakeRig([]))
    inventory = open_inventory()
    assert isinstance(inventory, NoGpus) and inventory.problem == "NVML found no NVIDIA GPU"
    assert fake.shutdowns == 1
