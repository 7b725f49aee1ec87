"""What placement needs to know about a GGUF model, read from its header and tensor table.

``read_model(path)`` opens the file with ``gguf.GGUFReader`` (a memory map: only the header
and the tensor table are touched, never the weights) and returns a frozen ``ModelInfo``:
the architecture facts the KV-cache estimate needs (layers, heads and KV heads, which may be
per-layer arrays, key/value lengths, sliding window and its layer pattern, context length,
vocab, experts) and the bytes of every tensor, grouped as llama.cpp groups them when it
assigns devices: the input layer (``token_embd``, kept on the host), the repeating layers
(``blk.N.*``) and the output layer (everything else; ``output.weight`` absent means tied
embeddings, and llama.cpp then loads ``token_embd`` a second time as the output).

Split models (``NAME-00001-of-00003.gguf``) are read as one model from all their parts.
A missing, damaged or unknown file raises ``ModelFileError`` with one line.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from inference_node.errors import ModelFileError

if TYPE_CHECKING:
    import gguf

SPLIT_NAME: Final = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
GGUF_MAGIC: Final = b"GGUF"
# Tensors that llama.cpp assigns to the input layer, which always stays on the host.
INPUT_TENSORS: Final = frozenset({"token_embd", "token_embd_norm", "pos_embd", "token_types"})
_BLOCK: Final = re.compile(r"^blk\.(\d+)\.")

# Default sliding-window layer patterns of the architectures that have one, from each model's
# load_swa_pattern(ml, n, dense_first) call in llama.cpp; a GGUF's own
# ``ARCH.attention.sliding_window_pattern`` (scalar or per-layer array) wins over these.
# (pattern, dense_first): with dense_first, layer il is full when il % n == 0; otherwise
# layer il is full when il % n == n - 1. Pattern 1 makes every layer sliding-window.
SWA_PATTERNS: Final[dict[str, tuple[int, bool]]] = {
    "gemma2": (2, False),
    "gemma3": (6, False),
    "gemma3n": (5, False),
    "gemma-embedding": (6, False),
    "cohere2": (4, False),
    "exaone4": (4, False),
    "gpt-oss": (2, False),
    "llama4": (4, False),
    "olmo2": (4, False),
    "phi3": (1, False),
    "afmoe": (4, False),
    "smallthinker": (4, True),
}
# gemma2 falls back to a 4096-token window when the GGUF names none.
SWA_DEFAULT_WINDOW: Final = {"gemma2": 4096}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the table: name, ggml type name, shape (ggml order) and bytes in the file."""

    name: str
    type_name: str
    shape: tuple[int, ...]
    n_bytes: int
    file_index: int = 0  # which split part holds it
    offset: int = 0  # where its data starts in that file

    @property
    def layer(self) -> int | None:
        """The block number of ``blk.N.*`` tensors, else None."""
        m = _BLOCK.match(self.name)
        return int(m.group(1)) if m else None

    @property
    def is_input(self) -> bool:
        return self.layer is None and self.name.split(".")[0] in INPUT_TENSORS


@dataclass(frozen=True)
class ModelInfo:
    """The architecture facts and tensor sizes of one model (all split parts together)."""

    path: Path
    files: tuple[Path, ...]
    architecture: str
    name: str | None
    file_type: int | None
    n_layer: int
    n_embd: int
    n_ff: int  # widest feed-forward layer
    n_ff_expert: int
    n_head: tuple[int, ...]  # per layer
    n_head_kv: tuple[int, ...]  # per layer; 0 means the layer has no KV cache
    head_dim_k: int
    head_dim_v: int
    head_dim_k_swa: int
    head_dim_v_swa: int
    n_ctx_train: int
    n_vocab: int
    n_expert: int
    n_expert_used: int
    sliding_window: int  # 0: no sliding-window attention
    swa_layers: tuple[bool, ...]  # per layer
    swa_pattern_known: bool
    tensors: tuple[TensorInfo, ...]
    # multi-head latent attention (DeepSeek-style): the cache holds one compressed K row
    # per layer (key_length values, one head) and no V
    is_mla: bool = False
    # recurrent layers (Mamba, RWKV, hybrids) keep a per-slot state the estimate omits
    recurrent: bool = False
    # derived numbers the estimate computes once per model (not part of its identity)
    cache: dict[object, object] = field(default_factory=dict, compare=False, repr=False)

    @cached_property
    def tied_embeddings(self) -> bool:
        """No ``output.weight``: llama.cpp reuses ``token_embd`` as the output matrix."""
        return not any(t.name == "output.weight" for t in self.tensors)

    @property
    def total_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    @cached_property
    def post_norms(self) -> bool:
        """Norms after attention and after the feed-forward too (gemma2 and kin): a graph
        whose activations llama.cpp's allocator packs differently."""
        return any(t.name.endswith(".post_ffw_norm.weight") for t in self.tensors)

    @cached_property
    def input_tensors(self) -> tuple[TensorInfo, ...]:
        return tuple(t for t in self.tensors if t.is_input)

    @cached_property
    def output_tensors(self) -> tuple[TensorInfo, ...]:
        """What llama.cpp loads on the output layer's device (``token_embd`` again when tied)."""
        own = tuple(t for t in self.tensors if t.layer is None and not t.is_input)
        if self.tied_embeddings:
            embd = [t for t in self.tensors if t.name == "token_embd.weight"]
            return own + tuple(embd)
        return own

    def layer_tensors(self, il: int) -> tuple[TensorInfo, ...]:
        return self._by_layer.get(il, ())

    @cached_property
    def _by_layer(self) -> dict[int, tuple[TensorInfo, ...]]:
        groups: dict[int, list[TensorInfo]] = {}
        for t in self.tensors:
            if t.layer is not None:
                groups.setdefault(t.layer, []).append(t)
        return {il: tuple(ts) for il, ts in groups.items()}

    @property
    def layer_bytes(self) -> tuple[int, ...]:
        sizes = [0] * self.n_layer
        for t in self.tensors:
            if t.layer is not None and t.layer < self.n_layer:
                sizes[t.layer] += t.n_bytes
        return tuple(sizes)

    @property
    def input_bytes(self) -> int:
        return sum(t.n_bytes for t in self.input_tensors)

    @property
    def output_bytes(self) -> int:
        return sum(t.n_bytes for t in self.output_tensors)

    @property
    def is_gqa(self) -> bool:
        return any(kv and kv < h for h, kv in zip(self.n_head, self.n_head_kv, strict=True))


def split_parts(path: Path) -> tuple[Path, ...]:
    """All parts of a split model named like ``path``, in order; ``(path,)`` if not split."""
    m = SPLIT_NAME.match(path.name)
    if not m:
        return (path,)
    count = int(m.group("count"))
    parts = tuple(
        path.with_name(f"{m.group('stem')}-{no:05d}-of-{count:05d}.gguf") for no in range(1, count + 1)
    )
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise ModelFileError(
            f"{path}: split model part {missing[0]} is missing ({len(missing)} of {count} parts); "
            "put every part in the same folder"
        )
    return parts


def read_model(path: Path | str) -> ModelInfo:
    """Read the header and tensor table of ``path`` (and its split siblings); see module doc."""
    import gguf  # numpy and more: loaded with the first model read, not at agent start

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file; check the path")
    parts = split_parts(path)
    readers = [_open(p) for p in parts]
    head = readers[0]
    tensors: list[TensorInfo] = []
    for index, r in enumerate(readers):
        for t in r.tensors:
            tensors.append(
                TensorInfo(
                    name=str(t.name),
                    type_name=gguf.GGMLQuantizationType(int(t.tensor_type)).name,
                    shape=tuple(int(x) for x in t.shape),
                    n_bytes=int(t.n_bytes),
                    file_index=index,
                    offset=int(t.data_offset),
                )
            )
    try:
        return _model_info(path, parts, head, tuple(tensors))
    except (KeyError, ValueError, TypeError, IndexError) as exc:
        raise ModelFileError(f"{parts[0]}: unexpected GGUF metadata ({exc}); is it a complete "
                             "llama.cpp model?") from exc


def _open(path: Path) -> gguf.GGUFReader:
    import gguf

    try:
        with path.open("rb") as f:
            magic = f.read(len(GGUF_MAGIC))
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read ({exc.strerror}); check permissions") from exc
    if magic != GGUF_MAGIC:
        raise ModelFileError(f"{path}: not a GGUF file (starts with {magic!r}); "
                             "convert it with llama.cpp's convert_hf_to_gguf.py")
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as exc:  # the reader raises anything from ValueError to struct.error
        raise ModelFileError(f"{path}: damaged or truncated GGUF ({type(exc).__name__}: {exc}); "
                             "download it again") from exc


class _Meta:
    """Typed access to the key/value metadata of one reader."""

    def __init__(self, reader: gguf.GGUFReader, source: Path) -> None:
        self._fields = reader.fields
        self._source = source

    def get(self, key: str) -> Any:
        field = self._fields.get(key)
        return None if field is None else field.contents()

    def number(self, key: str, default: int | None = None) -> int:
        value = self.get(key)
        if value is None:
            if default is None:
                raise ModelFileError(f"{self._source}: metadata key {key} is missing; "
                                     "the model file is incomplete or of an unknown kind")
            return default
        if isinstance(value, list):
            raise ModelFileError(f"{self._source}: metadata key {key} is an array; expected a number")
        return int(value)

    def array_len(self, key: str) -> int:
        """Entries of an array field without decoding them (a vocab has 100k+ strings)."""
        field = self._fields.get(key)
        return 0 if field is None else len(field.data)

    def per_layer(self, key: str, n_layer: int, default: int) -> tuple[int, ...]:
        value = self.get(key)
        if value is None:
            return (default,) * n_layer
        if isinstance(value, list):
            if len(value) != n_layer:
                raise ModelFileError(f"{self._source}: {key} has {len(value)} entries for "
                                     f"{n_layer} layers; the file is inconsistent")
            return tuple(int(v) for v in value)
        return (int(value),) * n_layer


def _model_info(path: Path, parts: tuple[Path, ...], reader: gguf.GGUFReader,
                tensors: tuple[TensorInfo, ...]) -> ModelInfo:
    meta = _Meta(reader, parts[0])
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelFileError(f"{parts[0]}: general.architecture is missing; not a llama.cpp model")
    n_layer = meta.number(f"{arch}.block_count")
    n_embd = meta.number(f"{arch}.embedding_length")
    n_ff = max(meta.per_layer(f"{arch}.feed_forward_length", n_layer, 0), default=0)
    n_head = meta.per_layer(f"{arch}.attention.head_count", n_layer, 0)
    n_head_kv = meta.per_layer(f"{arch}.attention.head_count_kv", n_layer, max(n_head))
    heads = max(n_head) or 1
    head_dim_k = meta.number(f"{arch}.attention.key_length", n_embd // heads)
    head_dim_v = meta.number(f"{arch}.attention.value_length", n_embd // heads)
    window = meta.number(f"{arch}.attention.sliding_window", SWA_DEFAULT_WINDOW.get(arch, 0))
    swa_layers, known = _swa_layers(meta, arch, n_layer, window)
    n_vocab = meta.number(f"{arch}.vocab_size", 0) or _vocab_from(meta, tensors)
    return ModelInfo(
        path=path,
        files=parts,
        architecture=arch,
        name=meta.get("general.name"),
        file_type=meta.get("general.file_type"),
        n_layer=n_layer,
        n_embd=n_embd,
        n_ff=n_ff,
        n_ff_expert=meta.number(f"{arch}.expert_feed_forward_length", n_ff),
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=head_dim_k,
        head_dim_v=head_dim_v,
        head_dim_k_swa=meta.number(f"{arch}.attention.key_length_swa", head_dim_k),
        head_dim_v_swa=meta.number(f"{arch}.attention.value_length_swa", head_dim_v),
        n_ctx_train=meta.number(f"{arch}.context_length", 0),
        n_vocab=n_vocab,
        n_expert=meta.number(f"{arch}.expert_count", 0),
        n_expert_used=meta.number(f"{arch}.expert_used_count", 0),
        sliding_window=window,
        swa_layers=swa_layers,
        swa_pattern_known=known,
        tensors=tensors,
        is_mla=meta.get(f"{arch}.attention.key_length_mla") is not None,
        recurrent=any(meta.get(f"{arch}.{key}") is not None
                      for key in ("ssm.state_size", "wkv.head_size", "rwkv.head_size")),
    )


def _swa_layers(meta: _Meta, arch: str, n_layer: int, window: int) -> tuple[tuple[bool, ...], bool]:
    """Which layers use the sliding window, and whether the pattern is known (not guessed).

    An unknown pattern counts every layer as full attention: the estimate then errs on the
    side of more KV cache, never less.
    """
    if window <= 0:
        return (False,) * n_layer, True
    value = meta.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(value, list):
        if len(value) != n_layer:
            raise ModelFileError(f"{meta._source}: sliding_window_pattern has {len(value)} entries "
                                 f"for {n_layer} layers; the file is inconsistent")
        return tuple(bool(v) for v in value), True
    default = SWA_PATTERNS.get(arch)
    if value is None and default is None:
        return (False,) * n_layer, False
    n_pattern, dense_first = default if default is not None else (0, False)
    if value is not None:
        n_pattern = int(value)
    return swa_pattern(n_layer, n_pattern, dense_first=dense_first), True


def swa_pattern(n_layer: int, n_pattern: int, *, dense_first: bool = False) -> tuple[bool, ...]:
    """llama.cpp's ``set_swa_pattern``: True for layers that use the sliding window."""
    if dense_first:
        return tuple(n_pattern == 0 or il % n_pattern != 0 for il in range(n_layer))
    return tuple(n_pattern == 0 or il % n_pattern < n_pattern - 1 for il in range(n_layer))


def _vocab_from(meta: _Meta, tensors: Sequence[TensorInfo]) -> int:
    n_tokens = meta.array_len("tokenizer.ggml.tokens")
    if n_tokens:
        return n_tokens
    for t in tensors:
        if t.name == "token_embd.weight" and len(t.shape) >= 2:
            return t.shape[1]
    return 0
