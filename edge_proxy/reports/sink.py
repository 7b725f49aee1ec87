"""Where the proxy keeps the records nodes report: behind ``ReportSink``.

``MemorySink`` keeps the newest ``MEMORY_SINK_RECORDS`` per node and kind, for status and
tests; the history store's recorder takes its place where history is on.
"""

from __future__ import annotations

from collections import deque
from typing import Final, Protocol

from shared.reports import BusyReport, CycleReport, GpuReport, InstanceReport

MEMORY_SINK_RECORDS: Final = 10_000


class ReportSink(Protocol):
    """Takes one stored record; returns at once and never raises."""

    def gpu_sample(self, node: str, record: GpuReport) -> None: ...
    def instance_change(self, node: str, record: InstanceReport) -> None: ...
    def cycle(self, node: str, record: CycleReport) -> None: ...
    def busy(self, node: str, record: BusyReport) -> None: ...
    def mark(self, node: str, stream: str, stored_through: int) -> None:
        """A batch of ``node``'s ``stream`` is stored through ``stored_through``."""


class MemorySink:
    """Keeps the newest records per node and kind in memory."""

    def __init__(self, limit: int = MEMORY_SINK_RECORDS) -> None:
        self.limit = limit
        self.gpu: dict[str, deque[GpuReport]] = {}
        self.instances: dict[str, deque[InstanceReport]] = {}
        self.cycles: dict[str, deque[CycleReport]] = {}
        self.busy_spans: dict[str, deque[BusyReport]] = {}

    def gpu_sample(self, node: str, record: GpuReport) -> None:
        self.gpu.setdefault(node, deque(maxlen=self.limit)).append(record)

    def instance_change(self, node: str, record: InstanceReport) -> None:
        self.instances.setdefault(node, deque(maxlen=self.limit)).append(record)

    def cycle(self, node: str, record: CycleReport) -> None:
        self.cycles.setdefault(node, deque(maxlen=self.limit)).append(record)

    def busy(self, node: str, record: BusyReport) -> None:
        self.busy_spans.setdefault(node, deque(maxlen=self.limit)).append(record)

    def mark(self, node: str, stream: str, stored_through: int) -> None:
        """Memory does not outlive the proxy: the intake's own marks are all there is."""
