"""The suspend action: the one thing the power manager does to the hardware, behind a
Protocol (tests put a recording fake there), and the real one, the configured command."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import trio

from inference_node.errors import SuspendFailed


class SuspendAction(Protocol):
    async def suspend(self) -> None:
        """Ask the OS to suspend; raise ``SuspendFailed`` with the reason if it refuses."""
        ...


@dataclass
class CommandSuspend:
    """Runs the configured suspend command (``systemctl suspend`` by default)."""

    argv: Sequence[str]
    timeout_s: float = 60.0

    async def suspend(self) -> None:
        with trio.move_on_after(self.timeout_s) as scope:
            try:
                result = await trio.run_process(list(self.argv), capture_stdout=True,
                                                capture_stderr=True, check=False)
            except OSError as exc:
                raise SuspendFailed(f"suspend command {self.argv[0]!r} cannot run: {exc.strerror}") from exc
        if scope.cancelled_caught:
            raise SuspendFailed(f"suspend command {' '.join(self.argv)!r} did not return in {self.timeout_s:.0f} s")
        if result.returncode != 0:
            err = result.stderr.decode(errors="replace").strip().splitlines()
            raise SuspendFailed(f"suspend command {' '.join(self.argv)!r} exited {result.returncode}: "
                                + (err[-1] if err else "no message"))
