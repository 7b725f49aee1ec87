"""Reports into the history store: GPU samples, busy spans, instance changes and sleep cycles
become rows of the proxy's SQLite history (``edge_proxy.history``), written by its one writer
thread, and so does how far each node's stream is stored (the intake's mark).

The newest records also stay in a ``MemorySink`` (status, tests): the recorder is write-only.
"""

from __future__ import annotations

import json

from edge_proxy.history.records import (
    BusyInterval,
    GpuSample,
    InstanceChange,
    ReportMark,
    SleepCycle,
)
from edge_proxy.history.store import Recorder
from edge_proxy.reports.sink import MemorySink
from shared.reports import BusyReport, CycleReport, GpuReport, InstanceReport


class HistorySink:
    """A ``ReportSink`` that records each stored report through the history recorder."""

    def __init__(self, recorder: Recorder, memory: MemorySink | None = None) -> None:
        self.recorder = recorder
        self.memory = memory if memory is not None else MemorySink()

    def gpu_sample(self, node: str, record: GpuReport) -> None:
        self.memory.gpu_sample(node, record)
        self.recorder.record_gpu_sample(GpuSample(
            record.t, node, record.gpu_uuid, utilization_pct=record.utilization_pct,
            memory_used_mib=record.memory_used_mib, temperature_c=record.temperature_c,
            power_w=record.power_w, pstate_wanted=record.pstate_wanted,
            pstate_read=record.pstate_read))

    def instance_change(self, node: str, record: InstanceReport) -> None:
        self.memory.instance_change(node, record)
        self.recorder.record_instance_change(InstanceChange(
            record.t, node, record.instance, record.change, record.state, record.reason))

    def cycle(self, node: str, record: CycleReport) -> None:
        self.memory.cycle(node, record)
        self.recorder.record_sleep_cycle(SleepCycle(
            record.t, node, record.outcome, record.detail,
            idle_to_suspend_s=record.idle_to_suspend_s,
            suspend_to_resume_s=record.suspend_to_resume_s,
            resume_to_ready_s=record.resume_to_ready_s,
            steps=json.dumps([[name, at] for name, at in record.steps])))

    def busy(self, node: str, record: BusyReport) -> None:
        self.memory.busy(node, record)
        self.recorder.record_busy_interval(BusyInterval(node, record.gpu_uuid, record.start,
                                                        record.end))

    def mark(self, node: str, stream: str, stored_through: int) -> None:
        self.recorder.record_report_mark(ReportMark(node, stream, stored_through))
