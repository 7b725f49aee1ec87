"""Small deterministic GGUF models that a real llama-server loads and serves.

Tests and the demo need a model that loads in milliseconds on a CPU, yet has the same
structure as a real one so that placement, KV-cache and log parsing see real numbers.
``write_tiny_model(path, spec)`` writes one from a frozen ``TinyModelSpec``:

- random weights drawn from a generator seeded by ``(spec.seed, tensor name)``, scaled
  small so generation stays finite; the same spec always gives the same bytes;
- a byte-level SentencePiece ("llama") vocab: three specials, the 256 byte tokens
  ``<0x00>``..``<0xFF>``, the space marker and two ChatML markers, so any text tokenizes;
- a ChatML chat template, so ``/v1/chat/completions`` works.

Families (``FAMILIES``) are the llama.cpp architectures verified to load and serve:
``llama`` (plain, GQA, tied embeddings, or Mixtral-style experts with ``n_expert``),
``qwen2`` (attention biases) and ``gemma2`` (sliding-window attention on every other layer,
always tied embeddings). ``PRESETS`` names one spec per model shape the VRAM estimate covers.

``TinyModelSpec(sentence="...")`` builds a llama that answers every prompt, greedily, with that
sentence (``DEMO_SENTENCE`` by default in the ``"llama-sentence"`` preset), so a person sees a
readable answer and tests compare text. See ``_sentence_tensors`` for how.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import gguf
import numpy as np
import numpy.typing as npt

TensorType = Literal["F32", "F16", "Q8_0", "Q4_0"]

FAMILIES: Final = ("llama", "qwen2", "gemma2")

# Standard deviation of random weight matrices: the usual transformer init. Small enough
# that activations stay far from overflow in F16, large enough that outputs vary by token.
WEIGHT_STD: Final = 0.02
BIAS_STD: Final = 0.01
RMS_NORM_EPS: Final = 1e-5
ROPE_FREQ_BASE: Final = 10000.0
# Q8_0 and Q4_0 pack rows in blocks of 32 values; every quantized row length must divide by it.
Q8_0_BLOCK: Final = 32

_GGML_TYPES: Final = {
    "F32": gguf.GGMLQuantizationType.F32,
    "F16": gguf.GGMLQuantizationType.F16,
    "Q8_0": gguf.GGMLQuantizationType.Q8_0,
    "Q4_0": gguf.GGMLQuantizationType.Q4_0,
}
_FILE_TYPES: Final = {
    "F32": gguf.LlamaFileType.ALL_F32,
    "F16": gguf.LlamaFileType.MOSTLY_F16,
    "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
}

CHATML_TEMPLATE: Final = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

DEMO_SENTENCE: Final = "Good morning: the GPU box was asleep."
# Logit of the one token a sentence model picks; every other logit is 0, so greedy and any
# low temperature both pick it.
SENTENCE_LOGIT_SCALE: Final = 30.0

# Vocab layout: ids 0..2 specials, 3..258 bytes, then the space marker and ChatML markers.
UNK_ID: Final = 0
BOS_ID: Final = 1
EOS_ID: Final = 2
_BYTE_BASE: Final = 3
SPACE_MARKER: Final = "\u2581"  # SentencePiece writes spaces as this character
IM_START: Final = "<|im_start|>"
IM_END: Final = "<|im_end|>"


@dataclass(frozen=True)
class TinyModelSpec:
    """What to build. Invalid combinations raise ``ValueError`` on construction.

    ``n_head_kv`` None means plain multi-head attention (``n_head``); fewer is GQA.
    ``n_expert`` > 0 (llama only) replaces each dense FFN with that many experts, of which
    ``n_expert_used`` run per token. ``sliding_window`` is the window of gemma2's SWA layers.
    ``tensor_type`` applies to weight matrices; norms and biases are always F32.
    """

    family: str = "llama"
    n_layer: int = 2
    n_embd: int = 64
    n_ff: int = 128
    n_head: int = 4
    n_head_kv: int | None = None
    n_ctx_train: int = 2048
    tied_embeddings: bool = False
    tensor_type: TensorType = "F32"
    n_expert: int = 0
    n_expert_used: int = 2
    sliding_window: int = 64
    seed: int = 0
    name: str = "llamanap-tiny"
    sentence: str | None = None

    def __post_init__(self) -> None:
        problems = list(_spec_problems(self))
        if problems:
            raise ValueError(f"TinyModelSpec({self.family}): " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_head_kv is None else self.n_head_kv

    @property
    def n_vocab(self) -> int:
        return len(vocab_tokens(self.sentence))




def sentence_pieces(sentence: str) -> list[str]:
    """The sentence's words as vocab pieces: the first as is, the others after the space marker."""
    words = sentence.split()
    return words[:1] + [SPACE_MARKER + w for w in words[1:]]


def _spec_problems(spec: TinyModelSpec) -> list[str]:
    problems: list[str] = []
    if spec.family not in FAMILIES:
        problems.append(f"family {spec.family!r} is not one of {', '.join(FAMILIES)}")
    if spec.tensor_type not in _GGML_TYPES:
        problems.append(f"tensor_type {spec.tensor_type!r} is not one of {', '.join(_GGML_TYPES)}")
    for field in ("n_layer", "n_embd", "n_ff", "n_head", "n_ctx_train"):
        if getattr(spec, field) < 1:
            problems.append(f"{field} must be >= 1")
    if problems:
        return problems
    if spec.n_embd % spec.n_head or spec.head_dim % 2:
        problems.append("n_embd must divide into n_head heads of even size (RoPE rotates pairs)")
    if spec.kv_heads < 1 or spec.n_head % spec.kv_heads:
        problems.append("n_head_kv must divide n_head")
    if spec.n_expert and spec.family != "llama":
        problems.append("experts (n_expert > 0) are only supported for family 'llama'")
    if spec.n_expert and not 1 <= spec.n_expert_used <= spec.n_expert:
        problems.append("n_expert_used must be between 1 and n_expert")
    if spec.family == "gemma2" and not spec.tied_embeddings:
        problems.append("gemma2 always ties its output to token_embd: set tied_embeddings=True")
    if spec.family == "gemma2" and spec.sliding_window < 1:
        problems.append("sliding_window must be >= 1")
    if spec.tensor_type in ("Q8_0", "Q4_0") and (spec.n_embd % Q8_0_BLOCK
                                                   or spec.n_ff % Q8_0_BLOCK):
        problems.append(f"{spec.tensor_type} needs n_embd and n_ff divisible by {Q8_0_BLOCK}")
    if spec.sentence is not None:
        problems += _sentence_problems(spec)
    return problems


def _sentence_problems(spec: TinyModelSpec) -> list[str]:
    if spec.family != "llama" or spec.n_expert or spec.tied_embeddings:
        return ["sentence needs a plain llama (family 'llama', no experts, untied output)"]
    pieces = sentence_pieces(spec.sentence or "")
    if not pieces:
        return ["sentence must have at least one word"]
    if len(set(pieces)) != len(pieces):
        return [f"sentence words must all differ (each word is a token that names its successor); "
                f"found {spec.sentence!r}"]
    if len(pieces) + 1 > spec.n_embd:
        return [f"sentence has {len(pieces)} words; n_embd must be at least one more"]
    return []


PRESETS: Final[dict[str, TinyModelSpec]] = {
    "llama": TinyModelSpec(),
    "llama-gqa": TinyModelSpec(n_head=8, n_head_kv=2, n_layer=4),
    "llama-tied": TinyModelSpec(tied_embeddings=True),
    "llama-moe": TinyModelSpec(n_expert=4, n_expert_used=2),
    "qwen2-bias": TinyModelSpec(family="qwen2", n_head_kv=2, tied_embeddings=True),
    "gemma2-swa": TinyModelSpec(family="gemma2", n_layer=4, n_head_kv=2, tied_embeddings=True),
    "llama-sentence": TinyModelSpec(sentence=DEMO_SENTENCE, name="llamanap-sentence"),
}


def vocab_tokens(sentence: str | None = None) -> list[tuple[str, float, gguf.TokenType]]:
    """The byte-level vocab as (text, score, type), in id order; with ``sentence``, one more
    token per word of it at the end.

    The tokenizer never produces the word tokens from a prompt: SentencePiece merges adjacent
    pieces only into pieces the vocab has, and no prefix of a word ("Go") is in it.
    """
    tokens: list[tuple[str, float, gguf.TokenType]] = [
        ("<unk>", 0.0, gguf.TokenType.UNKNOWN),
        ("<s>", 0.0, gguf.TokenType.CONTROL),
        ("</s>", 0.0, gguf.TokenType.CONTROL),
    ]
    tokens += [(f"<0x{b:02X}>", 0.0, gguf.TokenType.BYTE) for b in range(256)]
    # With the space marker in the vocab, spaces decode back to spaces instead of to three
    # raw bytes of U+2581.
    tokens.append((SPACE_MARKER, -1.0, gguf.TokenType.NORMAL))
    tokens.append((IM_START, 0.0, gguf.TokenType.CONTROL))
    tokens.append((IM_END, 0.0, gguf.TokenType.CONTROL))
    if sentence is not None:
        tokens += [(piece, 0.0, gguf.TokenType.NORMAL) for piece in sentence_pieces(sentence)]
    return tokens


def write_tiny_model(path: Path | str, spec: TinyModelSpec | None = None) -> Path:
    """Write the model described by ``spec`` (default: ``TinyModelSpec()``) to ``path``.

    The file appears atomically (written beside it, then renamed). Returns the path.
    """
    spec = spec or TinyModelSpec()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(tmp, spec.family)
    try:
        _add_metadata(writer, spec)
        tensors = _tensors(spec)
        if spec.sentence is not None:
            tensors = _sentence_tensors(spec, tensors)
        for name, array in tensors:
            _add_tensor(writer, name, array, spec.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    tmp.replace(path)
    return path


def _add_metadata(w: gguf.GGUFWriter, spec: TinyModelSpec) -> None:
    w.add_name(spec.name)
    w.add_file_type(_FILE_TYPES[spec.tensor_type])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(spec.n_ctx_train)
    w.add_embedding_length(spec.n_embd)
    w.add_block_count(spec.n_layer)
    w.add_feed_forward_length(spec.n_ff)
    w.add_head_count(spec.n_head)
    w.add_head_count_kv(spec.kv_heads)
    w.add_layer_norm_rms_eps(RMS_NORM_EPS)
    w.add_rope_freq_base(ROPE_FREQ_BASE)
    w.add_vocab_size(spec.n_vocab)
    if spec.family == "llama":
        w.add_rope_dimension_count(spec.head_dim)
    if spec.n_expert:
        w.add_expert_count(spec.n_expert)
        w.add_expert_used_count(spec.n_expert_used)
    if spec.family == "gemma2":
        w.add_sliding_window(spec.sliding_window)
        w.add_key_length(spec.head_dim)
        w.add_value_length(spec.head_dim)

    tokens = vocab_tokens(spec.sentence)
    w.add_tokenizer_model("llama")
    w.add_token_list([text for text, _, _ in tokens])
    w.add_token_scores([score for _, score, _ in tokens])
    w.add_token_types([int(kind) for _, _, kind in tokens])
    w.add_unk_token_id(UNK_ID)
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_eot_token_id([text for text, _, _ in tokens].index(IM_END))
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)
    w.add_chat_template(CHATML_TEMPLATE)


def _rng(spec: TinyModelSpec, name: str) -> np.random.Generator:
    # One generator per tensor: a tensor's values depend only on the seed and its name,
    # not on which other tensors the family has.
    return np.random.default_rng([spec.seed, zlib.crc32(name.encode())])


def _tensors(spec: TinyModelSpec) -> list[tuple[str, npt.NDArray[np.float32]]]:
    """All tensors in file order; numpy shapes are the reverse of ggml's ``ne``."""
    e, ff, hd = spec.n_embd, spec.n_ff, spec.head_dim
    q_dim, kv_dim = hd * spec.n_head, hd * spec.kv_heads
    out: list[tuple[str, npt.NDArray[np.float32]]] = []

    def matrix(name: str, *shape: int) -> None:
        out.append((name, _rng(spec, name).normal(0.0, WEIGHT_STD, shape).astype(np.float32)))

    def bias(name: str, n: int) -> None:
        out.append((name, _rng(spec, name).normal(0.0, BIAS_STD, (n,)).astype(np.float32)))

    def norm(name: str) -> None:
        out.append((name, np.ones((e,), dtype=np.float32)))

    matrix("token_embd.weight", spec.n_vocab, e)
    norm("output_norm.weight")
    if not spec.tied_embeddings:
        matrix("output.weight", spec.n_vocab, e)
    for i in range(spec.n_layer):
        blk = f"blk.{i}"
        norm(f"{blk}.attn_norm.weight")
        matrix(f"{blk}.attn_q.weight", q_dim, e)
        matrix(f"{blk}.attn_k.weight", kv_dim, e)
        matrix(f"{blk}.attn_v.weight", kv_dim, e)
        if spec.family == "qwen2":
            bias(f"{blk}.attn_q.bias", q_dim)
            bias(f"{blk}.attn_k.bias", kv_dim)
            bias(f"{blk}.attn_v.bias", kv_dim)
        matrix(f"{blk}.attn_output.weight", e, q_dim)
        if spec.family == "gemma2":
            norm(f"{blk}.post_attention_norm.weight")
        norm(f"{blk}.ffn_norm.weight")
        if spec.n_expert:
            matrix(f"{blk}.ffn_gate_inp.weight", spec.n_expert, e)
            matrix(f"{blk}.ffn_gate_exps.weight", spec.n_expert, ff, e)
            matrix(f"{blk}.ffn_up_exps.weight", spec.n_expert, ff, e)
            matrix(f"{blk}.ffn_down_exps.weight", spec.n_expert, e, ff)
        else:
            matrix(f"{blk}.ffn_gate.weight", ff, e)
            matrix(f"{blk}.ffn_up.weight", ff, e)
            matrix(f"{blk}.ffn_down.weight", e, ff)
        if spec.family == "gemma2":
            norm(f"{blk}.post_ffw_norm.weight")
    return out


def _add_tensor(
    w: gguf.GGUFWriter, name: str, array: npt.NDArray[np.float32], tensor_type: TensorType
) -> None:
    # Vectors (norms, biases) and the expert router stay F32: llama.cpp keeps them F32 too.
    if array.ndim == 1 or tensor_type == "F32" or name.endswith("ffn_gate_inp.weight"):
        w.add_tensor(name, array)
        return
    qtype = _GGML_TYPES[tensor_type]
    if tensor_type == "F16":
        w.add_tensor(name, array.astype(np.float16))
        return
    packed = gguf.quants.quantize(array, qtype)
    w.add_tensor(name, packed, raw_dtype=qtype)


def _sentence_tensors(
    spec: TinyModelSpec, tensors: list[tuple[str, npt.NDArray[np.float32]]]
) -> list[tuple[str, npt.NDArray[np.float32]]]:
    """The random tensors, rewired so that greedy decoding spells ``spec.sentence``.

    Each layer adds ``attn_output @ ...`` and ``ffn_down @ ...`` to the residual stream; with
    both zero, the final hidden state is the current token's embedding. So the model is a table
    from the last token to the next: every word token (and, for the start, every other token)
    embeds to its own unit vector, and the output matrix maps that vector to the next word,
    the last word to end-of-sequence.
    """
    n_base = len(vocab_tokens())
    n_words = len(sentence_pieces(spec.sentence or ""))
    embd = np.zeros((spec.n_vocab, spec.n_embd), dtype=np.float32)
    embd[:n_base, 0] = 1.0  # any prompt token: "start the sentence"
    output = np.zeros((spec.n_vocab, spec.n_embd), dtype=np.float32)
    output[n_base, 0] = SENTENCE_LOGIT_SCALE  # start -> first word
    for i in range(n_words):
        embd[n_base + i, i + 1] = 1.0
        successor = n_base + i + 1 if i + 1 < n_words else EOS_ID
        output[successor, i + 1] = SENTENCE_LOGIT_SCALE
    replaced = {"token_embd.weight": embd, "output.weight": output}
    return [(name, replaced.get(name, np.zeros_like(array)
                                if name.endswith(("attn_output.weight", "ffn_down.weight"))
                                else array))
            for name, array in tensors]
