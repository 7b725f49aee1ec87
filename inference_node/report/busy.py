"""Busy spans per GPU: when an instance on a GPU ran a task, as closed ``[start, end)`` spans.

Pure (times are passed in): the report service tells it which GPUs are busy now on every
busy/idle edge and at each sample tick, and records the spans it closes. A span open longer
than ``max_span_s`` is closed and a new one begun, so a crash, a cut cable or a machine that
sleeps mid-task loses at most that much of it.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Final

# Long enough to keep the records few (one per GPU per minute of work), short enough that
# the proxy's dashboard shows a long task while it runs.
MAX_SPAN_S: Final = 60.0


@dataclass(frozen=True)
class BusySpan:
    """GPU ``gpu_uuid`` had a task over ``[start, end)``."""

    gpu_uuid: str
    start: float
    end: float


class BusySpans:
    """The open span of each busy GPU, and the spans that closed."""

    def __init__(self, max_span_s: float = MAX_SPAN_S) -> None:
        self.max_span_s = max_span_s
        self._open: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"<BusySpans open={sorted(self._open)}>"

    def observe(self, busy: Collection[str], now: float) -> list[BusySpan]:
        """The GPUs in ``busy`` (UUIDs) have a task at ``now``, the others not; return the
        spans that closed (a GPU went idle, or its span reached ``max_span_s``)."""
        closed = []
        for uuid, since in list(self._open.items()):
            if uuid not in busy:
                del self._open[uuid]
            elif now - since < self.max_span_s:
                continue
            else:
                self._open[uuid] = now
            if now > since:
                closed.append(BusySpan(uuid, since, now))
        for uuid in sorted(busy):
            self._open.setdefault(uuid, now)
        return closed

    def close(self, now: float) -> list[BusySpan]:
        """Every open span, closed at ``now`` (the agent stops)."""
        return self.observe((), now)
