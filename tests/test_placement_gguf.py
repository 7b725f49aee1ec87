"""placement.gguf_info: architecture facts and tensor sizes read from real GGUF files."""

from __future__ import annotations

import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest

from inference_node.errors import ModelFileError
from inference_node.placement.gguf_info import read_model, swa_pattern
from shared.llama_bin import find_tool
from shared.tiny_gguf import PRESETS, TinyModelSpec, write_tiny_model

SPLIT_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("placement-models")
    return {name: write_tiny_model(folder / f"{name}.gguf", spec) for name, spec in PRESETS.items()}


def test_plain_llama_facts_and_sizes(models: dict[str, Path]) -> None:
    spec = PRESETS["llama"]
    m = read_model(models["llama"])
    assert (m.architecture, m.n_layer, m.n_embd, m.n_ff) == ("llama", spec.n_layer, spec.n_embd, spec.n_ff)
    assert m.n_head == (spec.n_head,) * spec.n_layer
    assert m.n_head_kv == (spec.n_head,) * spec.n_layer
    assert m.head_dim_k == m.head_dim_v == spec.n_embd // spec.n_head
    assert m.n_vocab == spec.n_vocab
    assert m.n_ctx_train == spec.n_ctx_train
    assert not m.tied_embeddings and not m.is_gqa and m.sliding_window == 0
    # F32 tensors: bytes are 4 per value; a layer is norms + q,k,v,o + gate, up, down
    e, ff = spec.n_embd, spec.n_ff
    layer = 4 * (2 * e + 4 * e * e + 3 * e * ff)
    assert m.layer_bytes == (layer,) * spec.n_layer
    assert m.input_bytes == 4 * spec.n_vocab * e
    assert m.output_bytes == 4 * (spec.n_vocab * e + e)
    assert m.total_bytes == m.input_bytes + m.output_bytes + sum(m.layer_bytes)
    assert m.total_bytes < models["llama"].stat().st_size


def test_gqa_heads(models: dict[str, Path]) -> None:
    m = read_model(models["llama-gqa"])
    assert m.n_head == (8,) * 4 and m.n_head_kv == (2,) * 4 and m.is_gqa


def test_tied_embeddings_put_token_embd_on_the_output_layer(models: dict[str, Path]) -> None:
    m = read_model(models["llama-tied"])
    assert m.tied_embeddings
    names = [t.name for t in m.output_tensors]
    assert "token_embd.weight" in names and "output.weight" not in names
    assert [t.name for t in m.input_tensors] == ["token_embd.weight"]


def test_experts(models: dict[str, Path]) -> None:
    m = read_model(models["llama-moe"])
    assert (m.n_expert, m.n_expert_used) == (4, 2)
    assert any(t.name == "blk.0.ffn_up_exps.weight" for t in m.layer_tensors(0))


def test_biases_count_in_their_layer(models: dict[str, Path]) -> None:
    m = read_model(models["qwen2-bias"])
    names = {t.name for t in m.layer_tensors(1)}
    assert {"blk.1.attn_q.bias", "blk.1.attn_k.bias", "blk.1.attn_v.bias"} <= names


def test_sliding_window_pattern_of_gemma2(models: dict[str, Path]) -> None:
    m = read_model(models["gemma2-swa"])
    assert m.sliding_window == PRESETS["gemma2-swa"].sliding_window
    assert m.swa_layers == (True, False, True, False)
    assert m.swa_pattern_known and m.tied_embeddings


def test_swa_pattern_rules() -> None:
    assert swa_pattern(6, 6) == (True,) * 5 + (False,)
    assert swa_pattern(4, 4, dense_first=True) == (False, True, True, True)
    assert swa_pattern(3, 1) == (False, False, False)
    assert swa_pattern(2, 0) == (True, True)


def test_per_layer_head_arrays_and_explicit_pattern(tmp_path: Path) -> None:
    path = tmp_path / "arrays.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(3)
    w.add_embedding_length(64)
    w.add_context_length(1024)
    w.add_head_count([4, 4, 4])
    w.add_head_count_kv([4, 2, 0])
    w.add_sliding_window(128)
    w.add_sliding_window_pattern([True, False, True])
    for il in range(3):
        w.add_tensor(f"blk.{il}.attn_q.weight", np.zeros((64, 64), dtype=np.float32))
    w.add_tensor("token_embd.weight", np.zeros((10, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    m = read_model(path)
    assert m.n_head_kv == (4, 2, 0)
    assert m.swa_layers == (True, False, True)
    assert m.n_vocab == 10  # from token_embd when no vocab is stored
    assert m.layer_bytes == (64 * 64 * 4,) * 3


def test_split_model_reads_all_parts(models: dict[str, Path], tmp_path: Path) -> None:
    tool = find_tool("llama-gguf-split")
    whole = read_model(models["llama"])
    subprocess.run([str(tool), "--split", "--split-max-tensors", "8", str(models["llama"]),
                    str(tmp_path / "split")], check=True, capture_output=True,
                   timeout=SPLIT_TIMEOUT_S)
    parts = sorted(tmp_path.glob("split-*-of-*.gguf"))
    assert len(parts) > 1
    m = read_model(parts[0])
    assert m.files == tuple(parts)
    assert m.total_bytes == whole.total_bytes
    assert m.layer_bytes == whole.layer_bytes
    assert read_model(parts[-1]).files == tuple(parts)  # any part names the whole model
    parts[1].unlink()
    with pytest.raises(ModelFileError, match=r"part .*-00002-of-.* is missing"):
        read_model(parts[0])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", r"not a GGUF file"),
        (b"PK\x03\x04zipfile", r"not a GGUF file \(starts with b'PK"),
        (b"GGUF\x03\x00\x00\x00\xff\xff", r"damaged or truncated GGUF"),
    ],
)
def test_damaged_files_give_one_line(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match=message) as info:
        read_model(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_truncated_model(models: dict[str, Path], tmp_path: Path) -> None:
    data = models["llama"].read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="damaged or truncated"):
        read_model(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="no such model file"):
        read_model(tmp_path / "nope.gguf")


def test_unknown_layout_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "nolayers.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_embedding_length(64)
    w.add_tensor("token_embd.weight", np.zeros((10, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelFileError, match=r"llama\.block_count is missing"):
        read_model(path)


def test_spec_variants_round_trip(tmp_path: Path) -> None:
    spec = TinyModelSpec(n_layer=3, n_embd=128, n_ff=256, n_head=4, n_head_kv=1,
                         tensor_type="Q8_0")
    m = read_model(write_tiny_model(tmp_path / "q8.gguf", spec))
    q = next(t for t in m.layer_tensors(0) if t.name.endswith("attn_q.weight"))
    assert q.type_name == "Q8_0" and q.n_bytes == 128 * 128 // 32 * 34
