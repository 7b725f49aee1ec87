"""The llama-server launch settings that decide its memory, and how llama.cpp resolves them.

``LaunchSettings`` holds what the user sets (``-c``, ``--parallel``, cache types, flash
attention, ``-ngl``, ``--tensor-split``, split mode, batch sizes). Its properties resolve
them the way this llama.cpp build does, so the estimate works from the same numbers that
llama-server prints (``n_ctx``, ``n_ctx_seq``, the number of KV streams).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Final, Literal

from inference_node.errors import PlacementError
from inference_node.placement.ggml_sizes import KV_CACHE_TYPES, is_quantized, pad

# llama.cpp rounds the context up to a multiple of 256 cells (llama_context constructor).
CTX_PAD: Final = 256
# llama-server's --parallel default ("auto"): 4 slots sharing one unified KV cache.
AUTO_PARALLEL: Final = 4
DEFAULT_BATCH: Final = 2048
DEFAULT_UBATCH: Final = 512

SplitMode = Literal["layer", "row", "none"]
FlashAttn = Literal["on", "off", "auto"]


@dataclass(frozen=True)
class LaunchSettings:
    """Memory-relevant llama-server flags. None means llama-server's own default.

    ``ctx`` None or 0 is the model's training context (``-c 0``). ``parallel`` None is
    llama-server's auto (4 slots, unified KV); an explicit ``--parallel N`` gives each slot
    its own KV stream unless ``kv_unified`` is True (``--kv-unified``). ``n_gpu_layers`` -1
    offloads every layer and the output layer (llama.cpp counts the output as one more layer).
    """

    ctx: int | None = None
    parallel: int | None = None
    kv_unified: bool | None = None
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    flash_attn: FlashAttn = "auto"
    n_gpu_layers: int = -1
    tensor_split: tuple[float, ...] = ()
    split_mode: SplitMode = "layer"
    main_gpu: int = 0
    n_batch: int = DEFAULT_BATCH
    n_ubatch: int = DEFAULT_UBATCH
    swa_full: bool = False
    kv_offload: bool = True
    mmap: bool = True
    repack: bool = True

    def __post_init__(self) -> None:
        for flag, value in (("--cache-type-k", self.cache_type_k),
                            ("--cache-type-v", self.cache_type_v)):
            if value not in KV_CACHE_TYPES:
                raise PlacementError(f"{flag} {value}: unknown cache type; expected one of "
                                     f"{', '.join(KV_CACHE_TYPES)}")
        if self.ctx is not None and self.ctx < 0:
            raise PlacementError(f"-c {self.ctx}: must be >= 0 (0 means the model's own)")
        if self.parallel is not None and self.parallel < 1:
            raise PlacementError(f"--parallel {self.parallel}: must be >= 1")
        if any(x < 0 for x in self.tensor_split):
            raise PlacementError("--tensor-split: proportions must be >= 0")
        if self.n_batch < 1 or self.n_ubatch < 1:
            raise PlacementError("--batch-size and --ubatch-size must be >= 1")
        if is_quantized(self.cache_type_v) and self.flash_attn == "off":
            raise PlacementError(f"--cache-type-v {self.cache_type_v} needs flash attention; "
                                 "use -fa on or an f16 V cache")

    def with_(self, **changes: object) -> LaunchSettings:
        return replace(self, **changes)  # type: ignore[arg-type]

    @property
    def n_seq(self) -> int:
        return AUTO_PARALLEL if self.parallel is None else self.parallel

    @property
    def unified(self) -> bool:
        if self.kv_unified is not None:
            return self.kv_unified
        return self.parallel is None

    @property
    def flash(self) -> bool:
        """Whether attention runs as flash attention ("auto" resolves to on where supported,
        which is every backend this estimate models)."""
        return self.flash_attn != "off"

    def n_ctx(self, n_ctx_train: int) -> int:
        """Total KV cells as llama.cpp resolves them (padded to 256, split per stream)."""
        return self.n_ctx_seq(n_ctx_train) * self.n_stream

    def n_ctx_seq(self, n_ctx_train: int) -> int:
        """Cells per KV stream (``n_ctx_seq`` in llama-server's log)."""
        total = pad(self.ctx or n_ctx_train, CTX_PAD)
        if self.unified:
            return total
        return pad(total // self.n_seq, CTX_PAD)

    @property
    def n_stream(self) -> int:
        return 1 if self.unified else self.n_seq

    def batch_sizes(self, n_ctx_train: int) -> tuple[int, int]:
        """``(n_batch, n_ubatch)`` after llama.cpp caps them by the (unpadded) context."""
        n_batch = min(self.ctx or n_ctx_train, self.n_batch)
        return n_batch, min(n_batch, self.n_ubatch)
