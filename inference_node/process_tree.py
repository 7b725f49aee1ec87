"""The process trees of the agent's instances (a wrapper script's child is the process CUDA
sees). Walking ``/proc`` blocks: call ``with_descendants`` off the event loop
(``trio.to_thread.run_sync``)."""

from __future__ import annotations

from collections.abc import Iterable

import psutil


def with_descendants(pids: Iterable[int]) -> set[int]:
    """``pids`` and every descendant of each; a process that exited meanwhile is skipped."""
    found: set[int] = set()
    for pid in pids:
        found.add(pid)
        try:
            found.update(p.pid for p in psutil.Process(pid).children(recursive=True))
        except psutil.Error:
            continue
    return found
