"""The P-state setter: the one thing that changes a GPU's performance state.

The real backend is ``inference_node.gpu.nvapi.NvapiBackend``; tests use a recording fake behind
``PstateBackend``. A backend never pretends: a switch that could not be made raises
``PstateError``, and a backend that cannot work at all says why in ``open()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, Protocol

from inference_node.gpu.inventory import GpuInfo

# NvAPI_GPU_SetForcePstate's "no forced state": the driver decides (nvidia-pstate's high).
PSTATE_DRIVER_DECIDES: Final = 16


class PstateBackend(Protocol):
    """Forces P-states on GPUs identified by their PCI bus id."""

    name: str

    def open(self, gpus: Sequence[GpuInfo]) -> dict[str, str | None]:
        """Prepare to switch ``gpus``: ``{uuid: None}`` where it can, else the reason it cannot.

        Raises PstateBackendUnavailable when it can switch no GPU at all.
        """
        ...

    def set_pstate(self, gpu: GpuInfo, pstate: int) -> None:
        """Force ``pstate`` (0..15, or 16 for "driver decides") on ``gpu``; raises PstateError."""
        ...

    def close(self) -> None:
        """Release the library; forced states stay as they are (release them first)."""
        ...
