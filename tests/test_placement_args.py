"""placement.args: llama-server flags to launch settings and back."""

from __future__ import annotations

import pytest

from inference_node.errors import PlacementError
from inference_node.placement.args import apply_plan, settings_from_args, settings_to_args
from inference_node.placement.settings import LaunchSettings


def test_spellings() -> None:
    s = settings_from_args(["--ctx-size=8192", "--parallel", "3", "-ctk", "q8_0",
                            "--cache-type-v=q8_0", "--flash-attn", "on", "--n-gpu-layers", "20",
                            "-ts", "3/1", "--split-mode", "row", "-mg", "1", "-b", "1024",
                            "-ub", "256", "-kvu", "--swa-full", "-nkvo", "--no-mmap",
                            "--port", "8080", "-m", "x.gguf"])
    assert s == LaunchSettings(ctx=8192, parallel=3, kv_unified=True, cache_type_k="q8_0",
                               cache_type_v="q8_0", flash_attn="on", n_gpu_layers=20,
                               tensor_split=(3.0, 1.0), split_mode="row", main_gpu=1,
                               n_batch=1024, n_ubatch=256, swa_full=True, kv_offload=False,
                               mmap=False)


def test_defaults_and_auto_parallel() -> None:
    assert settings_from_args([]) == LaunchSettings()
    assert settings_from_args(["-np", "-1"]).parallel is None
    assert settings_from_args(["-fa", "1"]).flash_attn == "on"


def test_round_trip() -> None:
    s = LaunchSettings(ctx=4096, parallel=2, cache_type_k="q8_0", flash_attn="on",
                       n_gpu_layers=10, tensor_split=(1.0, 2.0), swa_full=True)
    assert settings_from_args(settings_to_args(s)) == s.with_(kv_unified=False)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-c", "lots"], r"llama-server flags: invalid literal"),
        (["-fa", "maybe"], r"--flash-attn maybe: expected on, off or auto"),
        (["-sm", "tensor"], r"--split-mode tensor: expected layer, row or none"),
        (["-ctk", "q3_k"], r"--cache-type-k q3_k: unknown cache type"),
        (["-c"], r"-c needs a value"),
    ],
)
def test_bad_flags_are_one_line(argv: list[str], message: str) -> None:
    with pytest.raises(PlacementError, match=message):
        settings_from_args(argv)


def test_apply_plan_replaces_only_planned_flags() -> None:
    argv = ["-c", "2048", "--jinja", "-ngl", "99", "--tensor-split=1,1", "-t", "4"]
    assert apply_plan(argv, ["-ngl", "33", "-c", "8192"]) == \
        ["--jinja", "-t", "4", "-ngl", "33", "-c", "8192"]
