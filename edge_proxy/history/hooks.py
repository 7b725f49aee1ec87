"""What the request path holds while a request or a node's power state is under way, so the
hook-up in the HTTP routes and the wake driver is a few calls, not bookkeeping.

- ``RequestLog``: one per HTTP request. The route calls ``routed``, ``hold_started`` /
  ``hold_ended``, ``response_started`` and ``body`` (from ``Exchange.start``/``body``/``end``)
  as they happen, sets ``outcome`` where it knows one, and calls ``finish`` once; ``finish``
  records the row. Bodies are never kept: chunks go through a ``TimingsParser``.
- ``PowerStates``: pure; fed a node's state with the time, it returns the closed
  ``PowerInterval`` rows to record (on each change, and every ``MAX_INTERVAL_S`` so a crash
  loses at most that much).
- ``ConnectionLog``: one per relayed TCP connection: its hold, bytes each way, duration.
- ``NodeHistory``: what a node's wake driver records: its power states (from the wake
  machine's state) and each finished wake.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Final

from edge_proxy.history.records import (
    ConnectionRecord,
    Outcome,
    PowerInterval,
    PowerState,
    RequestRecord,
    WakeRecord,
)
from edge_proxy.history.store import Recorder
from edge_proxy.history.timings import LlamaNumbers, TimingsParser

# An open power-state interval is cut (recorded and restarted) after this long.
MAX_INTERVAL_S: Final = 300.0
# The wake machine's states (``State.value``) as power states: a waking or draining box
# draws awake power; UNKNOWN (before the first probe) is no interval at all. Busy time is
# not a state here: the agent reports each GPU's busy spans, and energy splits awake time
# by them.
POWER_OF_STATE: Final[dict[str, PowerState]] = {
    "ASLEEP": "asleep", "WAKING": "awake", "AWAKE": "awake", "DRAINING": "awake",
}


class RequestLog:
    """One HTTP request's history row in the making. ``wall`` gives the row's time (Unix s),
    ``clock`` the durations (``trio.current_time`` in the proxy)."""

    def __init__(self, recorder: Recorder, route: str, method: str, path: str, *,
                 clock: Callable[[], float], wall: Callable[[], float]) -> None:
        self._recorder = recorder
        self._clock = clock
        self._t = wall()
        self._start = clock()
        self.route, self.method, self.path = route, method, path
        self.node = ""
        self.model: str | None = None
        self.outcome: Outcome | None = None
        self._status: int | None = None
        self._ttfb: float | None = None
        self._held_s = 0.0
        self._hold_began: float | None = None
        self._woke = False  # a hold waited for the node's wake (else for a model's load)
        self._parser: TimingsParser | None = None
        self._finished = False

    def routed(self, node: str, model: str | None) -> None:
        """The node (and model) the request goes to."""
        self.node, self.model = node, model

    def hold_started(self, *, waking: bool = True) -> None:
        """The request waits from now: for the node's wake (then maybe a model's load), or,
        ``waking`` False, the node being awake, for a model's load alone."""
        self._hold_began = self._clock()
        self._woke = self._woke or waking

    def hold_ended(self) -> None:
        """The wait is over (the node is ready, or the wake failed)."""
        if self._hold_began is not None:
            self._held_s += self._clock() - self._hold_began
            self._hold_began = None

    def response_started(self, status: int, content_type: str | None) -> None:
        """Status and headers went to the client (proxy SSE comments while held count too)."""
        if self._ttfb is None:
            self._ttfb = self._clock() - self._start
        self._status = status
        if self._parser is None:  # (said again when SSE comments started the answer)
            self._parser = TimingsParser(content_type)

    def body(self, chunk: bytes) -> None:
        """A piece of the response body went to the client."""
        if self._parser is not None:
            self._parser.feed(chunk)

    def numbers(self) -> LlamaNumbers | None:
        """llama-server's numbers in the body passed so far (None without any)."""
        return self._parser.numbers() if self._parser is not None else None

    def finish(self, *, client_left: bool = False) -> None:
        """Record the row (once). Without an ``outcome`` set: ``client_left`` if the client
        went away, ``woke`` if it waited for a wake, ``loaded`` if only for a model's load,
        else ``relayed``."""
        if self._finished:
            return
        self._finished = True
        self.hold_ended()
        outcome: Outcome = self.outcome or (
            "client_left" if client_left else "relayed" if self._held_s <= 0
            else "woke" if self._woke else "loaded")
        numbers = self.numbers()
        self._recorder.record_request(RequestRecord(
            t=self._t, route=self.route, node=self.node, model=self.model, method=self.method,
            path=self.path, status=self._status, outcome=outcome, held_ms=self._held_s * 1000,
            ttfb_ms=None if self._ttfb is None else self._ttfb * 1000,
            total_ms=(self._clock() - self._start) * 1000,
            prompt_tokens=numbers.prompt_total if numbers else None,
            predicted_tokens=numbers.predicted_total if numbers else None,
            prompt_per_s=numbers.prompt_per_second if numbers else None,
            predicted_per_s=numbers.predicted_per_second if numbers else None))


class ConnectionLog:
    """One TCP connection's history row in the making (times as in ``RequestLog``)."""

    def __init__(self, recorder: Recorder, route: str, node: str, *,
                 clock: Callable[[], float], wall: Callable[[], float]) -> None:
        self._recorder = recorder
        self._clock = clock
        self._t = wall()
        self._start = clock()
        self.route, self.node = route, node
        self._held_s = 0.0
        self._bytes = {"up": 0, "down": 0}

    @contextmanager
    def holding(self, inner: Callable[[], AbstractContextManager[object]]) -> Iterator[None]:
        """Around each hold: time it, inside the route's own ``inner`` context."""
        with inner():
            began = self._clock()
            try:
                yield
            finally:
                self._held_s += self._clock() - began

    def count(self, way: str, n: int) -> None:
        """``n`` bytes went ``way`` ("up": client to node, "down": back)."""
        self._bytes[way] += n

    def finish(self) -> None:
        """The relay ended: record the row."""
        self._recorder.record_connection(ConnectionRecord(
            t=self._t, route=self.route, node=self.node, bytes_up=self._bytes["up"],
            bytes_down=self._bytes["down"], duration_ms=(self._clock() - self._start) * 1000,
            held_ms=self._held_s * 1000, woke=self._held_s > 0))


@dataclass
class _Open:
    state: PowerState
    since: float


class PowerStates:
    """Per node, the power state it is in since when; pure (times are passed in)."""

    def __init__(self, max_interval_s: float = MAX_INTERVAL_S) -> None:
        self._open: dict[str, _Open] = {}
        self._max_interval_s = max_interval_s

    def observe(self, node: str, state: PowerState | None, now: float) -> list[PowerInterval]:
        """``node`` is in ``state`` (None: unknown, e.g. before the first probe) at ``now``;
        return the intervals that closed."""
        closed: list[PowerInterval] = []
        current = self._open.get(node)
        if current is not None and (current.state != state
                                    or now - current.since >= self._max_interval_s):
            if now > current.since:
                closed.append(PowerInterval(node, current.state, current.since, now))
            current = None
            del self._open[node]
        if current is None and state is not None:
            self._open[node] = _Open(state, now)
        return closed

    def close(self, now: float) -> list[PowerInterval]:
        """Every open interval, closed at ``now`` (at shutdown)."""
        closed = [PowerInterval(node, o.state, o.since, now)
                  for node, o in self._open.items() if now > o.since]
        self._open.clear()
        return closed


class NodeHistory:
    """A node's power states and wakes, recorded as its wake driver applies events."""

    def __init__(self, recorder: Recorder, node: str) -> None:
        self._recorder = recorder
        self._node = node
        self._states = PowerStates()
        self._packets_seen = 0  # the machine's packet count at the last observation
        self._packets_at_start = 0
        self._wake_reason = ""
        self._waking = False
        self._wake_began = 0.0  # Unix time the wake began
        self._host_up_s: float | None = None
        self._port_open_s: float | None = None

    def observe(self, state: str, packets_total: int, reason: str, now: float) -> None:
        """The machine is in ``state`` (``State.value``, entered for ``reason``) having sent
        ``packets_total`` packets in all; ``now`` is Unix time. Called after every event."""
        if state == "WAKING" and not self._waking:
            # the event that started the wake already counted its first packet
            self._packets_at_start, self._wake_reason = self._packets_seen, reason
            self._wake_began, self._host_up_s, self._port_open_s = now, None, None
        self._waking = state == "WAKING"
        self._packets_seen = packets_total
        for interval in self._states.observe(self._node, POWER_OF_STATE.get(state), now):
            self._recorder.record_power_interval(interval)

    def probe(self, event: str, reason: str, now: float) -> None:
        """A probe result (``Event.value``) during a wake: the first answer of any kind
        means the host is up (a sleeping host does not answer; a refused connect means up,
        service not); the first HTTP answer ("GET /health answered 503") or success means
        the backend's port is open."""
        if not self._waking or event not in ("probe_ok", "probe_refused"):
            return
        after = now - self._wake_began
        if self._host_up_s is None:
            self._host_up_s = after
        if self._port_open_s is None and (event == "probe_ok" or " answered " in reason):
            self._port_open_s = after

    def wake_finished(self, outcome: str, duration_s: float, packets_total: int,
                      now: float) -> None:
        """A wake ended (``WakeFinished``): record it, ``duration_s`` after it started, with
        what started it."""
        total_ms = duration_s * 1000
        self._recorder.record_wake(WakeRecord(
            node=self._node, started=now - duration_s, outcome=outcome,
            reason=self._wake_reason,
            packets=packets_total - self._packets_at_start,
            host_up_ms=None if self._host_up_s is None else self._host_up_s * 1000,
            port_open_ms=None if self._port_open_s is None else self._port_open_s * 1000,
            ready_ms=total_ms if outcome == "ready" else None, total_ms=total_ms))

    def close(self, now: float) -> None:
        """The driver stops: record the open interval."""
        for interval in self._states.close(now):
            self._recorder.record_power_interval(interval)
