"""Instance → GPUs from CUDA_VISIBLE_DEVICES / CUDA_DEVICE_ORDER, on a rig whose orders differ."""

from __future__ import annotations

import pytest

from inference_node.gpu.assign import check_processes, cuda_order, env_for_gpus, gpus_for_env
from inference_node.gpu.inventory import GpuInfo, normalize_pci_bus_id
from tests.fakes.gpu import FakeNvml, three_gpu_rig

PCI = {"order": "PCI_BUS_ID"}


@pytest.fixture
def gpus() -> list[GpuInfo]:
    return FakeNvml(three_gpu_rig()).snapshot()


def uuid_on(gpus: list[GpuInfo], bus: str) -> str:
    return next(g.uuid for g in gpus if g.pci_bus_id == bus)


def test_cuda_order_is_pci_order_not_nvml_order(gpus: list[GpuInfo]) -> None:
    assert [g.index for g in gpus] == [0, 1, 2]
    assert [g.pci_bus_id for g in gpus] == ["0000:41:00.0", "0000:01:00.0", "0000:81:00.0"]
    assert [g.pci_bus_id for g in cuda_order(gpus)] == ["0000:01:00.0", "0000:41:00.0",
                                                        "0000:81:00.0"]


def test_indices_follow_pci_bus_order(gpus: list[GpuInfo]) -> None:
    a = gpus_for_env({"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "1,2"}, gpus)
    assert a.gpus == (uuid_on(gpus, "0000:41:00.0"), uuid_on(gpus, "0000:81:00.0"))
    assert a.problems == ()
    a = gpus_for_env({"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "0"}, gpus)
    assert a.gpus == (uuid_on(gpus, "0000:01:00.0"),)


def test_uuids_and_unique_prefixes_work_in_any_order(gpus: list[GpuInfo]) -> None:
    a = gpus_for_env({"CUDA_VISIBLE_DEVICES": "GPU-81818181,GPU-01010101-0000-0000-0000-000000000001"},
                     gpus)
    assert a.gpus == (uuid_on(gpus, "0000:81:00.0"), uuid_on(gpus, "0000:01:00.0"))
    assert a.problems == ()


def test_indices_without_pci_order_are_flagged(gpus: list[GpuInfo]) -> None:
    a = gpus_for_env({"CUDA_VISIBLE_DEVICES": "0"}, gpus)
    assert a.gpus == (uuid_on(gpus, "0000:01:00.0"),)
    assert len(a.problems) == 1 and "CUDA_DEVICE_ORDER=PCI_BUS_ID" in a.problems[0]


def test_parsing_stops_at_the_first_bad_entry_like_cuda(gpus: list[GpuInfo]) -> None:
    env = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "2,7,0"}
    a = gpus_for_env(env, gpus)
    assert a.gpus == (uuid_on(gpus, "0000:81:00.0"),)
    assert "index 7 is not a GPU" in a.problems[0]
    assert "matches 3 GPUs" in gpus_for_env({"CUDA_VISIBLE_DEVICES": "GPU-"}, gpus).problems[0]
    assert gpus_for_env({"CUDA_VISIBLE_DEVICES": ""}, gpus).gpus == ()
    assert "MIG" in gpus_for_env({"CUDA_VISIBLE_DEVICES": "MIG-abc"}, gpus).problems[0]


def test_unset_means_every_gpu_with_a_warning(gpus: list[GpuInfo]) -> None:
    a = gpus_for_env({}, gpus)
    assert len(a.gpus) == 3 and "not set" in a.problems[0]


def test_env_for_gpus_round_trips(gpus: list[GpuInfo]) -> None:
    env = env_for_gpus([2, 0], gpus)
    assert env == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "2,0"}
    assert gpus_for_env(env, gpus).gpus == (uuid_on(gpus, "0000:81:00.0"),
                                            uuid_on(gpus, "0000:01:00.0"))


def test_compute_processes_catch_a_wrong_assignment() -> None:
    rig = three_gpu_rig()
    rig.gpus[2].processes = (4242,)  # NVML: pid 4242 has a context on bus 0x81
    gpus = FakeNvml(rig).snapshot()
    right = gpus_for_env({"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "2"}, gpus)
    assert check_processes(right, [4242], gpus) == []
    wrong = gpus_for_env({"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "0"}, gpus)
    problems = check_processes(wrong, [4242], gpus)
    assert len(problems) == 1 and "0000:81:00.0" in problems[0]


@pytest.mark.parametrize("text,expected", [
    ("00000000:01:00.0", "0000:01:00.0"), ("0000:81:00.0", "0000:81:00.0"),
    ("01:00.0", "0000:01:00.0"), ("00000001:0A:1F.7", "0001:0a:1f.7"),
])
def test_pci_bus_ids_are_normalized(text: str, expected: str) -> None:
    assert normalize_pci_bus_id(text) == expected


def test_a_bad_pci_bus_id_is_refused() -> None:
    with pytest.raises(ValueError, match="not a PCI bus id"):
        normalize_pci_bus_id("GPU-1234")
