"""shared.tiny_gguf: deterministic bytes and the shapes and metadata llama.cpp reads."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from shared.tiny_gguf import (
    CHATML_TEMPLATE,
    FAMILIES,
    PRESETS,
    TinyModelSpec,
    vocab_tokens,
    write_tiny_model,
)


def _read(path: Path) -> gguf.GGUFReader:
    return gguf.GGUFReader(path)


def _field(reader: gguf.GGUFReader, key: str) -> object:
    field = reader.get_field(key)
    assert field is not None, key
    return field.contents()


def _tensor(reader: gguf.GGUFReader, name: str) -> np.ndarray:
    return next(t.data for t in reader.tensors if t.name == name)


def _shapes(reader: gguf.GGUFReader) -> dict[str, tuple[str, list[int]]]:
    return {t.name: (t.tensor_type.name, [int(n) for n in t.shape]) for t in reader.tensors}


def test_same_spec_gives_same_bytes(tmp_path: Path) -> None:
    spec = TinyModelSpec(n_head_kv=2, seed=7)
    a = write_tiny_model(tmp_path / "a.gguf", spec).read_bytes()
    b = write_tiny_model(tmp_path / "b.gguf", spec).read_bytes()
    assert a == b


def test_seed_changes_weights_not_layout(tmp_path: Path) -> None:
    a = _read(write_tiny_model(tmp_path / "a.gguf", TinyModelSpec(seed=1)))
    b = _read(write_tiny_model(tmp_path / "b.gguf", TinyModelSpec(seed=2)))
    assert _shapes(a) == _shapes(b)
    assert not np.array_equal(_tensor(a, "token_embd.weight"), _tensor(b, "token_embd.weight"))


def test_default_llama_metadata_and_shapes(tmp_path: Path) -> None:
    spec = TinyModelSpec()
    reader = _read(write_tiny_model(tmp_path / "m.gguf", spec))
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "llama.block_count") == spec.n_layer
    assert _field(reader, "llama.embedding_length") == spec.n_embd
    assert _field(reader, "llama.attention.head_count_kv") == spec.n_head
    assert _field(reader, "tokenizer.ggml.model") == "llama"
    assert _field(reader, "tokenizer.chat_template") == CHATML_TEMPLATE
    tokens = _field(reader, "tokenizer.ggml.tokens")
    assert isinstance(tokens, list)
    assert len(tokens) == spec.n_vocab == len(vocab_tokens())
    assert {f"<0x{b:02X}>" for b in range(256)} <= set(tokens)
    shapes = _shapes(reader)
    assert shapes["token_embd.weight"] == ("F32", [spec.n_embd, spec.n_vocab])
    assert shapes["output.weight"] == ("F32", [spec.n_embd, spec.n_vocab])
    assert shapes["blk.1.ffn_down.weight"] == ("F32", [spec.n_ff, spec.n_embd])
    assert len(shapes) == 3 + 9 * spec.n_layer


def test_gqa_tied_and_quantized_shapes(tmp_path: Path) -> None:
    spec = TinyModelSpec(n_head=8, n_head_kv=2, tied_embeddings=True, tensor_type="Q8_0")
    shapes = _shapes(_read(write_tiny_model(tmp_path / "m.gguf", spec)))
    assert "output.weight" not in shapes
    assert shapes["blk.0.attn_k.weight"] == ("Q8_0", [spec.n_embd, spec.head_dim * 2])
    assert shapes["blk.0.attn_q.weight"] == ("Q8_0", [spec.n_embd, spec.n_embd])
    assert shapes["blk.0.attn_norm.weight"] == ("F32", [spec.n_embd])


def test_family_specific_tensors(tmp_path: Path) -> None:
    moe = _shapes(_read(write_tiny_model(tmp_path / "moe.gguf", PRESETS["llama-moe"])))
    assert moe["blk.0.ffn_up_exps.weight"][1] == [64, 128, 4]
    assert moe["blk.0.ffn_gate_inp.weight"][1] == [64, 4]
    qwen = _shapes(_read(write_tiny_model(tmp_path / "q.gguf", PRESETS["qwen2-bias"])))
    assert qwen["blk.0.attn_k.bias"] == ("F32", [32])
    gemma_path = write_tiny_model(tmp_path / "g.gguf", PRESETS["gemma2-swa"])
    gemma = _read(gemma_path)
    assert _field(gemma, "gemma2.attention.sliding_window") == PRESETS["gemma2-swa"].sliding_window
    assert "blk.3.post_ffw_norm.weight" in _shapes(gemma)


def test_every_family_has_a_preset() -> None:
    assert {spec.family for spec in PRESETS.values()} == set(FAMILIES)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"family": "mamba"}, "family 'mamba'"),
        ({"n_head": 3}, "n_embd must divide"),
        ({"n_head_kv": 3}, "n_head_kv must divide"),
        ({"family": "qwen2", "n_expert": 4}, "only supported for family 'llama'"),
        ({"family": "gemma2"}, "tied_embeddings=True"),
        ({"n_ff": 100, "tensor_type": "Q8_0"}, "Q8_0 needs"),
    ],
)
def test_invalid_specs_say_why(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TinyModelSpec(**kwargs)  # type: ignore[arg-type]
