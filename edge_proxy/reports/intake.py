"""The proxy's side of the report protocol: each record stored once, in order.

Per node the intake remembers the agent's stream and the highest ``seq`` stored from it. A
batch of a new stream (the agent restarted) starts over; records at or below the mark are
duplicates (a resend after a lost reply) and skipped. Each batch's mark also goes to the
sink, which keeps it with the rows where history is on; a proxy started again begins from
the marks stored (``initial``), so a batch re-sent after a restart is not stored twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge

from edge_proxy.history.records import ReportMark
from edge_proxy.reports.sink import ReportSink
from shared.reports import (
    BusyReport,
    CycleReport,
    GpuReport,
    InstanceReport,
    Report,
    ReportBatch,
    ReportReply,
)

log = logging.getLogger(__name__)

RecordListener = Callable[[str, Report], None]


@dataclass
class StreamMark:
    """How far one node's current stream is stored."""

    stream: str
    stored_through: int = 0
    agent_dropped: int = 0


class ReportIntake:
    """Stores what a batch adds (through ``sink``) and shows each new record to ``listener``."""

    def __init__(self, sink: ReportSink, listener: RecordListener,
                 registry: CollectorRegistry, initial: Iterable[ReportMark] = ()) -> None:
        """``initial``: the marks a previous run of the proxy stored."""
        self.sink = sink
        self.listener = listener
        self.marks: dict[str, StreamMark] = {}
        for mark in initial:
            self.marks[mark.node] = StreamMark(mark.stream, mark.stored_through)
        self.received = Counter("edge_reports", "Report records stored, by node and kind",
                                ["node", "kind"], registry=registry)
        self.duplicates = Counter("edge_reports_duplicates",
                                  "Report records received again and skipped", ["node"],
                                  registry=registry)
        self.agent_dropped = Gauge("edge_reports_agent_dropped", "Report records the node's "
                                   "agent dropped unsent (its buffer was full), this agent run",
                                   ["node"], registry=registry)

    def __repr__(self) -> str:
        return f"<ReportIntake {self.marks}>"

    def receive(self, batch: ReportBatch) -> ReportReply:
        """Store the records of ``batch`` not stored before; say how far the stream is stored."""
        mark = self.marks.get(batch.node)
        if mark is None or mark.stream != batch.stream:
            if mark is not None:
                log.info("reports: node %s started a new stream %s (was %s through %d)",
                         batch.node, batch.stream, mark.stream, mark.stored_through)
            mark = self.marks[batch.node] = StreamMark(batch.stream)
        duplicates = 0
        before = mark.stored_through
        for record in batch.records:
            if record.seq <= mark.stored_through:
                duplicates += 1
                continue
            self._store(batch.node, record)
            mark.stored_through = record.seq
        if mark.stored_through != before:
            self.sink.mark(batch.node, mark.stream, mark.stored_through)
        if duplicates:
            self.duplicates.labels(batch.node).inc(duplicates)
        if batch.dropped > mark.agent_dropped:
            log.warning("reports: node %s dropped %d record(s) it could not send in time",
                        batch.node, batch.dropped - mark.agent_dropped)
        mark.agent_dropped = batch.dropped
        self.agent_dropped.labels(batch.node).set(batch.dropped)
        return ReportReply(batch.node, batch.stream, mark.stored_through, duplicates)

    def _store(self, node: str, record: Report) -> None:
        if isinstance(record, GpuReport):
            self.sink.gpu_sample(node, record)
        elif isinstance(record, InstanceReport):
            self.sink.instance_change(node, record)
        elif isinstance(record, CycleReport):
            self.sink.cycle(node, record)
        elif isinstance(record, BusyReport):
            self.sink.busy(node, record)
        self.received.labels(node, record.kind).inc()
        self.listener(node, record)

    def status(self) -> dict[str, dict[str, object]]:
        """Per node: the stream and how far it is stored."""
        return {node: {"stream": m.stream, "stored_through": m.stored_through,
                       "agent_dropped": m.agent_dropped} for node, m in sorted(self.marks.items())}
