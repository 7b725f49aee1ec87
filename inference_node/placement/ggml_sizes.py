"""Byte sizes the way ggml computes them: row sizes per type, buffer alignment, padding.

These are the few rules of ggml that decide what llama.cpp allocates, so the estimate can
reproduce its buffer sizes exactly rather than approximately.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from inference_node.errors import PlacementError

if TYPE_CHECKING:
    import gguf

MIB: Final = 1024 * 1024

# The KV cache types llama-server accepts for --cache-type-k/-v.
KV_CACHE_TYPES: Final = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")

# Buffer alignment per backend kind: the CPU (and an RPC server backed by a CPU) aligns
# tensors to 32 bytes (TENSOR_ALIGNMENT), CUDA to 128.
ALIGNMENT: Final = {"cpu": 32, "rpc": 32, "cuda": 128}
# CUDA pads quantized matrices to a multiple of 512 values per row (MATRIX_ROW_PADDING) so
# its kernels can read whole blocks past the end of the last row.
CUDA_MATRIX_ROW_PADDING: Final = 512


def ggml_type(name: str) -> gguf.GGMLQuantizationType:
    """The ggml type for a name such as ``q8_0`` or ``F16`` (case-insensitive)."""
    import gguf  # numpy and more: loaded when placement first computes, not at agent start

    try:
        return gguf.GGMLQuantizationType[name.upper()]
    except KeyError:
        raise PlacementError(
            f"unknown ggml type {name!r}; expected one of {', '.join(KV_CACHE_TYPES)}"
        ) from None


def row_size(type_name: str, n: int) -> int:
    """``ggml_row_size``: bytes of ``n`` values of a type (n must fill whole blocks)."""
    block, size = _quant_sizes()[ggml_type(type_name)]
    if n % block:
        raise PlacementError(f"{n} values do not fill whole {type_name} blocks of {block}; "
                             "pick another cache type")
    return n // block * size


def block_size(type_name: str) -> int:
    """Values per block of a type (1 for f32/f16/bf16)."""
    block, _ = _quant_sizes()[ggml_type(type_name)]
    return int(block)


def _quant_sizes() -> dict[gguf.GGMLQuantizationType, tuple[int, int]]:
    import gguf

    return gguf.GGML_QUANT_SIZES


def is_quantized(type_name: str) -> bool:
    return block_size(type_name) > 1


def pad(n: int, multiple: int) -> int:
    """``GGML_PAD``: round ``n`` up to a multiple."""
    return (n + multiple - 1) // multiple * multiple


def alloc_size(kind: str, type_name: str, shape: tuple[int, ...], n_bytes: int) -> int:
    """Bytes a backend of ``kind`` reserves for one weight tensor, alignment included."""
    size = n_bytes
    if kind == "cuda" and shape and is_quantized(type_name):
        ne0 = shape[0]
        if ne0 % CUDA_MATRIX_ROW_PADDING:
            size += row_size(type_name, CUDA_MATRIX_ROW_PADDING - ne0 % CUDA_MATRIX_ROW_PADDING)
    return pad(size, ALIGNMENT.get(kind, ALIGNMENT["cpu"]))


def mib(n_bytes: float) -> float:
    return n_bytes / MIB
