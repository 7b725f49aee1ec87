"""``node-agent analyze`` and ``node-agent plan`` on real GGUF files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inference_node.cli import main
from inference_node.gpu.inventory import open_inventory
from shared.tiny_gguf import PRESETS, TinyModelSpec, write_tiny_model

SPEC = TinyModelSpec(n_layer=8, n_embd=256, n_ff=512, n_head=8, n_head_kv=2, n_ctx_train=8192)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("cli") / "m.gguf", SPEC)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_analyze(capsys: pytest.CaptureFixture[str], model: Path) -> None:
    code, out, _ = run(capsys, "analyze", str(model))
    assert code == 0
    assert "architecture    llama" in out
    assert "layers          8 (+1 output layer)" in out
    assert "heads           8, KV heads 2  (GQA)" in out
    assert "input layer     0.26 MiB (stays on the host)" in out
    code, out, _ = run(capsys, "analyze", "--layers", str(model))
    assert code == 0 and out.count("    blk.") == SPEC.n_layer


def test_analyze_sliding_window_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = write_tiny_model(tmp_path / "g.gguf", PRESETS["gemma2-swa"])
    code, out, _ = run(capsys, "analyze", "--json", str(path))
    facts = json.loads(out)
    assert code == 0
    assert facts["architecture"] == "gemma2" and facts["swa_layers"] == [0, 2]
    assert facts["tied_embeddings"] is True and len(facts["layer_mib"]) == 4


def test_analyze_damaged_file_is_one_line(capsys: pytest.CaptureFixture[str],
                                          tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    code, out, err = run(capsys, "analyze", str(bad))
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "damaged or truncated GGUF" in err


def test_plan_on_assumed_gpus(capsys: pytest.CaptureFixture[str], model: Path) -> None:
    code, out, _ = run(capsys, "plan", str(model), "-c", "4096", "--assume-gpus", "200,400",
                       "--margin-mib", "0", "--process-mib", "0")
    assert code == 0
    assert "1 GPU(s), all layers on GPU, n_ctx 4096" in out
    assert "CUDA_VISIBLE_DEVICES=assumed-0" in out  # the smaller card that fits
    assert "flags: -ngl 9 -c 4096" in out


def test_plan_json_split(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # ~142 MiB on one device: two cards of 100 MiB hold it between them
    wide = TinyModelSpec(n_layer=8, n_embd=512, n_ff=2048, n_head=8, n_head_kv=2)
    path = write_tiny_model(tmp_path / "wide.gguf", wide)
    code, out, _ = run(capsys, "plan", str(path), "-c", "2048", "-np", "2", "--json",
                       "--assume-gpus", "100,100", "--margin-mib", "0", "--process-mib", "0")
    plan = json.loads(out)
    assert code == 0, out
    assert [g["uuid"] for g in plan["gpus"]] == ["assumed-0", "assumed-1"]
    assert plan["args"][:4] == ["-ngl", "9", "-c", "2048"] and "-ts" in plan["args"]
    assert all(g["total_mib"] <= g["free_mib"] for g in plan["gpus"])
    assert plan["env"]["CUDA_VISIBLE_DEVICES"] == "assumed-0,assumed-1"


def test_plan_refusal_is_one_line(capsys: pytest.CaptureFixture[str], model: Path) -> None:
    code, out, _ = run(capsys, "plan", str(model), "-c", "8192", "--assume-gpus", "20")
    assert code == 1
    assert out.count("\n") == 1 and out.startswith("instance m: needs ")


def test_plan_for_the_host_without_nvml(capsys: pytest.CaptureFixture[str], model: Path) -> None:
    if open_inventory().problem is None:
        pytest.skip("this machine has NVML GPUs; the host-only plan is for boxes without them")
    code, out, _ = run(capsys, "plan", str(model), "-c", "4096", "--check")
    assert code == 0
    assert out.startswith("no GPUs (") and "plan for the host" in out
    assert "flags: -ngl 0 -c 4096" in out
    # llama.cpp's own dry run, beside ours
    assert "check: llama-fit-params (llama.cpp's own dry run) vs this estimate, MiB:" in out
    host_line = next(line for line in out.splitlines() if line.strip().startswith("Host"))
    # llama.cpp prints whole MiB (truncated); ours beside it
    assert host_line.split()[1:3] == ["17/17.53", "8/8.0"]


def test_plan_config_places_auto_instances(capsys: pytest.CaptureFixture[str], model: Path,
                                           tmp_path: Path) -> None:
    cfg = tmp_path / "node-agent.toml"
    cfg.write_text(f"""
[agent]
state_file = "{tmp_path / 'state.toml'}"

[placement]
safety_margin_mib = 0

[instances.one]
model = "{model}"
port = 18090
args = ["-c", "4096"]
gpus = "auto"

[instances.two]
model = "{model}"
port = 18091
args = ["-c", "2048"]
gpus = "auto"

[instances.pinned]
model = "{model}"
port = 18092
gpus = [0]
""")
    code, out, _ = run(capsys, "plan", "--config", str(cfg), "--json", "--assume-gpus", "100,100",
                       "--process-mib", "0")
    shown = json.loads(out)
    assert code == 0 and set(shown["plans"]) == {"one", "two"} and not shown["refused"]
    # both fit on the first card; the second stays empty
    assert shown["plans"]["one"]["gpus"] == shown["plans"]["two"]["gpus"] == ["assumed-0"]
    assert shown["free_after_mib"]["assumed-1"] == 100
    code, out, _ = run(capsys, "plan", "--config", str(cfg), "--assume-gpus", "40")
    assert code == 1 and "instance" in out and "needs" in out


def test_plan_host_on_demand(capsys: pytest.CaptureFixture[str], model: Path) -> None:
    code, out, _ = run(capsys, "plan", str(model), "--host", "-c", "2048", "--assume-gpus",
                       "8192", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["host_only"] == "--host"
    assert data["args"] == ["-ngl", "0", "-c", "2048"]


def test_plan_fixed_layers_and_split(capsys: pytest.CaptureFixture[str], model: Path) -> None:
    # -ngl / -ts are estimated as given on the first GPUs, one per proportion
    code, out, _ = run(capsys, "plan", str(model), "-c", "2048", "-np", "2", "-kvu", "-b", "512",
                       "-ngl", "5", "-ts", "1,1", "--assume-gpus", "8192,8192,8192", "--json")
    assert code == 0, out
    data = json.loads(out)
    assert data["fits"] is True
    assert [g["layers"] for g in data["gpus"]] == [[4, 5, 6], [7, 8]]
    assert data["host"]["layers"] == [0, 1, 2, 3]
    assert {"-ngl", "5", "-kvu", "-b", "512"} <= set(data["args"])
    code, out, _ = run(capsys, "plan", str(model), "-ngl", "99", "--assume-gpus", "1",
                       "-c", "2048")
    assert code == 1 and "does not fit" in out


def test_plan_split_needs_one_proportion_per_gpu(capsys: pytest.CaptureFixture[str],
                                                 model: Path) -> None:
    code, _, err = run(capsys, "plan", str(model), "-ts", "1,1,1", "--assume-gpus", "8192")
    assert code != 0 and "give one per GPU" in err
