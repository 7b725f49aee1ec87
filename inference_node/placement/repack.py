"""Which weights llama.cpp's CPU backend repacks into its ``CPU_REPACK`` buffer.

On a CPU with the right SIMD features, the CPU backend keeps some quantized matrices in an
interleaved layout (``ggml_repack_get_optimal_repack_type`` in ggml-cpu/repack.cpp): a
matrix used by a matrix multiplication (not ``token_embd``, which is only looked up) whose
type and row count suit the kernel is copied out of the mmap'd file into a ``CPU_REPACK``
buffer of the same size. The mapped span (``CPU_Mapped``) then covers only the tensors left
in place, so where a model's host layers are repacked the host holds both the repacked
copies and a mapping that no longer spans them. ``--no-repack`` turns it off.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Final

from inference_node.placement.gguf_info import TensorInfo

CPUINFO: Final = Path("/proc/cpuinfo")
# Tensors only looked up by row (GET_ROWS), never multiplied: never repacked.
LOOKUP_ONLY: Final = frozenset({"token_embd.weight"})


@dataclass(frozen=True)
class CpuFeatures:
    """The SIMD features that decide repacking (x86: AVX2, AVX-512; Arm: dot product, i8mm)."""

    avx2: bool = False
    avx512: bool = False
    dotprod: bool = False
    i8mm: bool = False

    def rows_multiple(self, type_name: str) -> int | None:
        """Row count (``ne[1]``) a matrix of this type must divide by to be repacked here,
        or None when this CPU keeps the type as it is (the order llama.cpp tries)."""
        t = type_name.upper()
        if t == "Q4_0":
            if self.avx2:
                return 8
            return 4 if self.i8mm or self.dotprod else None
        if t == "Q4_K":
            return 8 if self.avx2 or self.i8mm or self.dotprod else None
        if t == "Q2_K":
            return 8 if self.avx512 else None
        if t == "IQ4_NL":
            if self.avx2:
                return 8
            return 4 if self.dotprod else None
        return None


NO_REPACK: Final = CpuFeatures()


@cache
def host_cpu() -> CpuFeatures:
    """This machine's features from /proc/cpuinfo (none where it cannot be read)."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return NO_REPACK
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return CpuFeatures(avx2="avx2" in flags, avx512="avx512f" in flags,
                       dotprod="asimddp" in flags, i8mm="i8mm" in flags)


def is_repacked(t: TensorInfo, cpu: CpuFeatures) -> bool:
    """Whether the CPU backend moves this weight into ``CPU_REPACK`` (2-D matrices, and the
    3-D expert banks of MoE layers)."""
    if t.name in LOOKUP_ONLY or len(t.shape) not in (2, 3):
        return False
    multiple = cpu.rows_multiple(t.type_name)
    return multiple is not None and t.shape[1] % multiple == 0
