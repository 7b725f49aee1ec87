"""An instance's MiB per device as the scheduler sees them: GPUs resolved as CUDA does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from inference_node.gpu.inventory import GpuInfo
from inference_node.ondemand.estimate import HOST_DEVICE, InstanceEstimator, instance_need
from shared.config.loader import Context, build
from shared.config.node import InstanceConfig
from shared.errors import LlamanapError
from shared.tiny_gguf import TinyModelSpec, write_tiny_model

# NVML lists them in another order than PCI bus order: gpus = [1] is the second by bus id
GPUS = [GpuInfo(0, "GPU-bbbb", "0000:81:00.0", "B", 24576, 24000),
        GpuInfo(1, "GPU-aaaa", "0000:01:00.0", "A", 24576, 24000)]


def config(tmp_path: Path, **table: Any) -> InstanceConfig:
    model = write_tiny_model(tmp_path / "m.gguf", TinyModelSpec(n_embd=128, n_head=4))
    return build(InstanceConfig, {"model": str(model), "port": 8001,
                                  "args": ["-c", "1024", "-ngl", "99"], **table},
                 Context(tmp_path / "node.toml"), "instances.m")


def test_listed_gpus_by_pci_bus_order(tmp_path: Path) -> None:
    need = instance_need("m", config(tmp_path, gpus=[1]), GPUS)
    assert list(need) == ["GPU-bbbb"]
    assert need["GPU-bbbb"] > 300  # llama.cpp's buffers plus the process's own CUDA share


def test_auto_or_unset_spreads_over_every_gpu(tmp_path: Path) -> None:
    for table in ({"gpus": "auto"}, {}):
        need = instance_need("m", config(tmp_path, **table), GPUS)
        assert list(need) == ["GPU-aaaa", "GPU-bbbb"]


def test_cpu_only_host(tmp_path: Path) -> None:
    need = instance_need("m", config(tmp_path), [])
    assert list(need) == [HOST_DEVICE] and need[HOST_DEVICE] > 0


def test_a_gpu_that_is_not_there(tmp_path: Path) -> None:
    with pytest.raises(LlamanapError, match=r"instances\.m\.gpus: .*index 5 is not a GPU"):
        instance_need("m", config(tmp_path, gpus=[5]), GPUS)


async def test_estimator_says_why_not(tmp_path: Path) -> None:
    cfg = build(InstanceConfig, {"model": str(tmp_path / "missing.gguf"), "port": 8001},
                Context(tmp_path / "node.toml"), "instances.m")
    need, problem = await InstanceEstimator().need("m", cfg, [])
    assert need is None and problem is not None
    assert problem.startswith("cannot estimate its memory: ") and "missing.gguf" in problem
