"""The report component of the agent: samples the GPUs, notes when each GPU is busy, instance
changes and sleep cycles, and sends them to the edge proxy in numbered batches.

It gets the GPU inventory, the P-states the controller wants (a callable), the GPUs that
have a task now (a callable), and the power manager's cycle history (a callable);
``on_state`` is a supervisor state listener and ``on_busy`` an activity listener. Records
wait in a ``ReportBuffer`` until the proxy says it stored them, so an unreachable proxy (it
restarts, the network is down, the machine slept mid-send) costs nothing but delay, up to
``report.buffer_records``; beyond that the oldest go, counted. Without ``[proxy]`` or with
``report.enabled = false`` it runs idle.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any, Final

import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from inference_node.errors import ProxyUnreachable
from inference_node.gpu.inventory import GpuInventory
from inference_node.report.buffer import ReportBuffer
from inference_node.report.busy import BusySpans
from inference_node.report.client import ReportClient
from inference_node.report.convert import CycleLike, cycle_report, gpu_reports, instance_report
from inference_node.supervisor.state import State
from shared.config.node import NodeAgentConfig, ProxySection, ReportSection
from shared.http import App, Request, Response
from shared.reports import BusyReport, Report, ReportBatch

log = logging.getLogger(__name__)

# On the way out, one last batch may go; a proxy that does not answer must not hold the stop.
FINAL_FLUSH_TIMEOUT_S: Final = 2.0
STREAM_ID_BYTES: Final = 6  # 12 hex digits: a new stream per agent start

WantedPstates = Callable[[], Mapping[str, int | None]]
CycleHistory = Callable[[], Sequence[CycleLike]]
BusyGpus = Callable[[], Collection[str]]


class ReportService:
    """Component: GPU samples, instance changes and cycles, buffered and sent to the proxy."""

    def __init__(self, node: str, proxy: ProxySection | None, settings: ReportSection,
                 inventory: GpuInventory, *, wanted: WantedPstates,
                 cycles: CycleHistory, busy_gpus: BusyGpus = lambda: (),
                 wall: Callable[[], float] = time.time) -> None:
        self.node = node
        self.settings = settings
        self.inventory = inventory
        self.wanted = wanted
        self.cycles = cycles
        self.busy_gpus = busy_gpus
        self.wall = wall
        self.busy_spans = BusySpans()
        self.stream = secrets.token_hex(STREAM_ID_BYTES)
        self.buffer = ReportBuffer(settings.buffer_records)
        self.client = ReportClient(proxy) if proxy is not None and settings.enabled else None
        self.sent_batches = 0
        self.last_error = ""
        self._reported_cycles: set[float] = set()
        self._batch_ready = trio.Event()

    def __repr__(self) -> str:
        target = self.client.url if self.client else "no proxy"
        return f"<ReportService {self.node} stream={self.stream} {self.buffer!r} -> {target}>"

    @property
    def active(self) -> bool:
        return self.client is not None

    # -- inputs -------------------------------------------------------------------------------

    def on_state(self, name: str, old: State, new: State, reason: str) -> None:
        """State listener: loaded, unloaded and crashed instances become records."""
        record = instance_report(name, old, new, reason, self.wall())
        if record is not None and self.active:
            self._add(record)

    def on_busy(self, instance: str, busy: bool, t: float) -> None:
        """Activity listener: on each busy/idle edge, the spans of GPUs that went idle."""
        if self.active:
            self.note_busy()

    def note_busy(self) -> None:
        """Compare the GPUs busy now with the open spans; add the spans that closed."""
        now = self.wall()
        for span in self.busy_spans.observe(self.busy_gpus(), now):
            self._add(BusyReport(0, now, span.gpu_uuid, span.start, span.end))

    def on_reload(self, config: NodeAgentConfig) -> None:
        """Intervals and the batch size apply from the next round; the buffer keeps its size."""
        for key in ("buffer_records", "enabled"):
            if getattr(config.report, key) != getattr(self.settings, key):
                log.warning("reload: report.%s changed; restart node-agent to apply it", key)
        self.settings = config.report

    # -- the loops ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sample and send until cancelled; on the way out, one last try to send."""
        if not self.active:
            task_status.started()
            return
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._sample_loop)
                nursery.start_soon(self._send_loop)
                task_status.started()
        finally:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(FINAL_FLUSH_TIMEOUT_S):
                    now = self.wall()
                    for span in self.busy_spans.close(now):
                        self._add(BusyReport(0, now, span.gpu_uuid, span.start, span.end))
                    self.note_cycles()
                    await self.flush()
                assert self.client is not None
                await self.client.aclose()

    async def _sample_loop(self) -> None:
        while True:
            await self.sample()
            self.note_busy()  # cuts a long span, so the proxy sees a long task as it runs
            await trio.sleep(self.settings.sample_interval_s)

    async def _send_loop(self) -> None:
        while True:
            with trio.move_on_after(self.settings.send_interval_s):
                await self._batch_ready.wait()
            self._batch_ready = trio.Event()
            self.note_cycles()
            await self.flush()

    async def sample(self) -> None:
        """One GPU sample of every GPU (NVML is read off the event loop)."""
        if self.inventory.problem is not None:
            return
        gpus = await trio.to_thread.run_sync(self.inventory.snapshot)
        for record in gpu_reports(gpus, self.wanted(), self.wall()):
            self._add(record)

    def note_cycles(self) -> None:
        """Add the power manager's cycles that ended since the last look."""
        history = list(self.cycles())
        for cycle in history:
            if cycle.started in self._reported_cycles:
                continue
            record = cycle_report(cycle, self.wall())
            if record is not None:
                self._reported_cycles.add(cycle.started)
                self._add(record)
        self._reported_cycles &= {c.started for c in history}

    async def flush(self) -> bool:
        """Send what is buffered, oldest first, batch by batch; False when the proxy did not
        store it all (the rest stays for the next round)."""
        if self.client is None:
            return False
        while len(self.buffer):
            records = self.buffer.oldest(self.settings.batch_records)
            batch = ReportBatch(self.node, self.stream, records, self.buffer.dropped)
            self.buffer.sending(records)
            try:
                reply = await self.client.send(batch)
            except ProxyUnreachable as exc:
                self.buffer.send_failed()
                if not self.last_error:  # one line per outage, not one per round
                    log.warning("reports: %s; keeping %d record(s) to send later (at most %d)",
                                exc, len(self.buffer), self.buffer.capacity)
                self.last_error = str(exc)
                return False
            self.buffer.stored_through(reply.stored_through)
            self.sent_batches += 1
            if self.last_error:
                log.info("reports: proxy %s stores again", self.client.cfg.url)
                self.last_error = ""
            if reply.stored_through < records[-1].seq:
                log.warning("reports: proxy stored through %d of %d; sending the rest later",
                            reply.stored_through, records[-1].seq)
                return False
        return True

    def _add(self, record: Report) -> None:
        before = self.buffer.dropped
        self.buffer.add(record)
        if self.buffer.dropped > before and self.buffer.dropped == 1:
            log.warning("reports: buffer full (report.buffer_records = %d); dropping the oldest "
                        "records until the proxy stores again", self.buffer.capacity)
        if len(self.buffer) >= self.settings.batch_records:
            self._batch_ready.set()

    # -- what the agent offers ---------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {"enabled": self.active, "proxy": self.client.url if self.client else None,
                "stream": self.stream, "buffered": len(self.buffer),
                "capacity": self.buffer.capacity, "last_seq": self.buffer.last_seq,
                "stored": self.buffer.stored, "dropped": self.buffer.dropped,
                "batches_sent": self.sent_batches, "last_error": self.last_error}

    def routes(self, app: App) -> None:
        """``GET /v1/report``: the buffer and the last send error."""

        @app.route("GET", "/v1/report")
        async def report(req: Request) -> Response:
            return Response.json(self.status())

    def collectors(self) -> list[Collector]:
        return [_ReportCollector(self)]


class _ReportCollector(Collector):
    def __init__(self, service: ReportService) -> None:
        self.service = service

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        b = self.service.buffer
        yield GaugeMetricFamily("llamanap_agent_reports_buffered",
                                "Report records waiting for the proxy to store them", value=len(b))
        yield CounterMetricFamily("llamanap_agent_reports_stored",
                                  "Report records the proxy stored", value=b.stored)
        yield CounterMetricFamily("llamanap_agent_reports_dropped",
                                  "Report records dropped unsent because the buffer was full",
                                  value=b.dropped)
