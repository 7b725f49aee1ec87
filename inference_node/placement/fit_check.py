"""Ask llama.cpp itself: run ``llama-fit-params --fit-print on`` with the planned flags.

``llama-fit-params`` (same build as llama-server) loads only the model's metadata, builds
the context without allocating it and prints, per device, the MiB it would use for the
model, the context (KV) and the compute buffer. ``plan --check`` shows these beside ours.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from inference_node.errors import PlacementError

# A dry run reads the header and reserves graphs: seconds, even for large models.
FIT_TIMEOUT_S: Final = 120.0


@dataclass(frozen=True)
class FitLine:
    """One device as llama-fit-params prints it, in MiB."""

    device: str
    model_mib: int
    context_mib: int
    compute_mib: int

    @property
    def total_mib(self) -> int:
        return self.model_mib + self.context_mib + self.compute_mib


def parse_fit_print(stdout: str) -> list[FitLine]:
    """Lines ``DEVICE MODEL CONTEXT COMPUTE`` (MiB) from ``--fit-print on``."""
    out = []
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 4 and all(p.isdigit() for p in parts[1:]):
            out.append(FitLine(parts[0], int(parts[1]), int(parts[2]), int(parts[3])))
    return out


def run_fit_params(tool: Path, model: Path, flags: Sequence[str],
                   env: Mapping[str, str] | None = None) -> list[FitLine]:
    """Run the dry run and return its per-device lines; PlacementError with the reason."""
    argv = [str(tool), "-m", str(model), *flags, "--fit", "off", "--fit-print", "on"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=FIT_TIMEOUT_S,
                              env={**os.environ, **(env or {})}, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PlacementError(f"{tool}: did not run ({exc}); check the llama.cpp install") from exc
    lines = parse_fit_print(done.stdout)
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise PlacementError(f"{tool.name} failed (exit {done.returncode}): {tail}")
    return lines
