"""Periodic ``GET /slots`` (and ``GET /metrics``) of every running instance.

The log is the fast path for activity; this check corrects drift: a missed line, or a child that
restarted mid-task. An answer that disagrees with the log is applied to the tracker and logged,
unless a log event arrived while the request was in flight (the log is then newer).

``/metrics`` (llama-server ``--metrics``) gives tokens/s and ``requests_processing``; an
instance without it is noted once and its metrics left empty.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Final

import httpx
import trio

from inference_node.activity.tracker import BusyTracker

log = logging.getLogger(__name__)

# The log reports every task edge at once; this only catches rare drift, so a slow period is
# enough and keeps the load on a busy server negligible.
SLOTS_CHECK_INTERVAL_S: Final = 10.0
# llama-server answers /slots from its HTTP threads even while a slot computes.
REQUEST_TIMEOUT_S: Final = 3.0
# Answers that mean "this endpoint is switched off" (--no-slots, no --metrics).
_DISABLED: Final = frozenset({404, 501})
# Counters, not llamacpp:predicted_tokens_seconds: that gauge covers only the time since the
# previous scrape and reads 0 whenever nothing was generated in between.
_TOKENS_TOTAL: Final = "llamacpp:tokens_predicted_total"
_TOKENS_SECONDS: Final = "llamacpp:tokens_predicted_seconds_total"
_REQUESTS_PROCESSING: Final = "llamacpp:requests_processing"

Endpoints = Callable[[], Mapping[str, str]]
"""Returns ``{instance: base URL}`` of the instances that run now."""


def processing_slots(payload: Any) -> dict[int, int] | None:
    """``{slot: task}`` of the busy slots in a ``/slots`` answer; None if it is not one."""
    if not isinstance(payload, list):
        return None
    busy: dict[int, int] = {}
    for slot in payload:
        if not isinstance(slot, dict) or type(slot.get("id")) is not int:
            return None
        if slot.get("is_processing") is True:
            task = slot.get("id_task")
            busy[slot["id"]] = task if type(task) is int else -1
    return busy


def parse_metrics(text: str) -> dict[str, float]:
    """Unlabelled samples of a Prometheus text exposition: ``{name: value}``."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.partition(" ")
        try:
            samples[name] = float(value.split()[0])
        except (ValueError, IndexError):
            continue
    return samples


class SlotsReconciler:
    """Checks ``/slots`` and ``/metrics`` of each instance every ``interval_s``."""

    def __init__(self, tracker: BusyTracker, endpoints: Endpoints, *,
                 interval_s: float = SLOTS_CHECK_INTERVAL_S) -> None:
        self.tracker = tracker
        self.endpoints = endpoints
        self.interval_s = interval_s
        self.checks = 0
        self._no_slots: set[str] = set()  # URLs whose /slots is off, noted once
        self._no_metrics: set[str] = set()
        self._counters: dict[str, tuple[float, float]] = {}  # instance -> (tokens, seconds)

    def __repr__(self) -> str:
        return f"<SlotsReconciler every {self.interval_s:g} s, {self.checks} check(s)>"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Check every ``interval_s`` until cancelled."""
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as client:
            task_status.started()
            while True:
                await trio.sleep(self.interval_s)
                await self.check_all(client)

    async def check_all(self, client: httpx.AsyncClient) -> list[str]:
        """Check every running instance once; returns the corrections made."""
        corrections: list[str] = []
        self.checks += 1

        async def one(name: str, url: str) -> None:
            reason = await self.check(client, name, url)
            if reason:
                corrections.append(reason)

        async with trio.open_nursery() as nursery:
            for name, url in dict(self.endpoints()).items():
                nursery.start_soon(one, name, url)
        return corrections

    async def check(self, client: httpx.AsyncClient, name: str, url: str) -> str | None:
        """Check one instance; returns the correction made, if any. Never raises for I/O."""
        record = self.tracker.instance(name)
        seq = record.seq
        reason: str | None = None
        if url not in self._no_slots:
            answer = await self._get(client, url, "/slots", self._no_slots, name)
            if answer is not None:
                try:
                    busy = processing_slots(answer.json())
                except ValueError:
                    busy = None
                if busy is None:
                    log.debug("%s: /slots answered something else than a slot list", name)
                else:
                    reason = self.tracker.reconcile(name, busy, seq, trio.current_time())
        if url not in self._no_metrics:
            answer = await self._get(client, url, "/metrics", self._no_metrics, name)
            if answer is not None:
                samples = parse_metrics(answer.text)
                self._update_speed(name, samples)
                processing = samples.get(_REQUESTS_PROCESSING)
                record.requests_processing = None if processing is None else int(processing)
        return reason

    def _update_speed(self, name: str, samples: Mapping[str, float]) -> None:
        """Generation tokens/s since the previous scrape; the lifetime average at first."""
        tokens, seconds = samples.get(_TOKENS_TOTAL), samples.get(_TOKENS_SECONDS)
        if tokens is None or seconds is None:
            return
        record = self.tracker.instance(name)
        before = self._counters.get(name, (0.0, 0.0))
        if tokens < before[0] or seconds < before[1]:  # the server restarted
            before = (0.0, 0.0)
        self._counters[name] = (tokens, seconds)
        if seconds - before[1] > 0:
            record.tokens_per_second = (tokens - before[0]) / (seconds - before[1])
        record.tokens_predicted = int(tokens)

    async def _get(self, client: httpx.AsyncClient, url: str, path: str, disabled: set[str],
                   name: str) -> httpx.Response | None:
        try:
            with trio.fail_after(REQUEST_TIMEOUT_S):
                response = await client.get(url.rstrip("/") + path)
        except (httpx.HTTPError, trio.TooSlowError) as exc:
            log.debug("%s: GET %s failed: %s", name, path, exc)
            return None
        if response.status_code in _DISABLED:
            disabled.add(url)
            log.info("%s: %s is not enabled on %s (HTTP %d); not checking it",
                     name, path, url, response.status_code)
            return None
        if response.status_code != 200:
            log.debug("%s: GET %s answered %d", name, path, response.status_code)
            return None
        return response
