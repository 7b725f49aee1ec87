"""Runs one node's wake machine under trio: probes, magic packets, held connections.

``NodeDriver`` owns a node's ``WakeMachine``. Its own tasks (started by ``run``) probe the
backend while the machine wants probes, tick it at its deadlines and send the magic packets
it asks for. Everything else talks to it through a few calls:

- ``await wait_awake()``: returns when the node is AWAKE; holds the caller meanwhile (and
  starts the one shared wake if none is running); raises ``WakeFailed`` when the wake times
  out. Routes call it through ``edge_proxy.admission``, their one admit/hold/connect step.
- ``connect_failed(exc, generation)``: a relay could not reach an AWAKE backend.
- ``agent_event(kind, reason)`` / ``suspending(in_flight)``: the node's agent reports.
- ``wake_now()``: an operator asks for a packet now.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import trio

from edge_proxy.errors import BackendUnavailable, WakeFailed, WolError
from edge_proxy.history.hooks import NodeHistory
from edge_proxy.history.store import Recorder
from edge_proxy.metrics import ProxyMetrics
from edge_proxy.probe import check_ready
from edge_proxy.wake.machine import (
    Action,
    Event,
    FailHeld,
    ReleaseHeld,
    SendPacket,
    State,
    Verdict,
    WakeFinished,
    WakeMachine,
    WakeTiming,
)
from edge_proxy.wake.wol import WolSender, magic_packet
from shared.config.edge import NodeConfig
from shared.events import HeldWork

log = logging.getLogger(__name__)


_AGENT_EVENTS = {"resumed": Event.AGENT_RESUMED, "ready": Event.AGENT_READY,
                 "suspended": Event.AGENT_SUSPENDED}


@dataclass(frozen=True)
class Backend:
    """One route's backend on this node: what to probe for readiness."""

    port: int
    http_path: str | None  # None: ready when it accepts


@dataclass
class _Round:
    """One batch of held connections, released or failed together."""

    done: trio.Event = field(default_factory=trio.Event)
    failure: str | None = None


class NodeDriver:
    """A node's wake state machine plus the trio tasks and counters around it."""

    def __init__(self, name: str, cfg: NodeConfig, metrics: ProxyMetrics, sender: WolSender,
                 *, drain_timeout_s: float | None = None, recorder: Recorder | None = None) -> None:
        self.name = name
        self.history = None if recorder is None else NodeHistory(recorder, name)
        self.cfg = cfg
        self.metrics = metrics
        self.sender = sender
        self.backends: set[Backend] = set()
        self.machine = WakeMachine(name, self._timing(cfg), trio.current_time())
        self.held = 0
        self.active = 0
        self.held_by_port: Counter[int] = Counter()
        self.held_by_model: Counter[str] = Counter()  # models held requests asked for
        self.last_packet_error: str | None = None
        self._round = _Round()
        self._changed = trio.Event()
        self._packets_tx, self._packets_rx = trio.open_memory_channel[None](math.inf)
        metrics.set_state(name, self.machine.state)

    def __repr__(self) -> str:
        return f"<NodeDriver {self.name} {self.machine.state.name} held={self.held} active={self.active}>"

    @staticmethod
    def _timing(cfg: NodeConfig) -> WakeTiming:
        return WakeTiming(cfg.wol_interval_s, cfg.wake_timeout_s, cfg.drain_timeout_s,
                          cfg.wake_cooldown_s, cfg.asleep_probe_interval_s)

    def update(self, cfg: NodeConfig) -> None:
        """Take a reloaded config; the state and held connections stay."""
        self.cfg = cfg
        self.machine.timing = self._timing(cfg)
        self._poke()

    @property
    def state(self) -> State:
        return self.machine.state

    # ---- the tasks ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Probe, tick and send packets until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._send_packets)
                nursery.start_soon(self._tick)
                nursery.start_soon(self._probe)
                task_status.started()
        finally:
            if self.history is not None:
                self.history.close(time.time())

    async def _send_packets(self) -> None:
        async for _ in self._packets_rx:
            packet = magic_packet(self.cfg.mac_bytes, self.cfg.wol.password_bytes)
            try:
                await self.sender.send(packet, self.cfg.wol)
            except WolError as exc:
                # keep going: the next interval retries, and the wake timeout bounds it all
                self.last_packet_error = str(exc)
                self.metrics.packet_errors.labels(self.name).inc()
                log.warning("node %s: %s", self.name, exc)
                continue
            self.metrics.packets.labels(self.name).inc()
            log.info("node %s: magic packet for %s sent to %s:%d", self.name, self.cfg.mac,
                     self.cfg.wol.broadcast, self.cfg.wol.port)

    async def _tick(self) -> None:
        while True:
            changed = self._changed
            deadline = self.machine.next_deadline()
            with trio.move_on_at(math.inf if deadline is None else deadline):
                await changed.wait()
            self.apply(Event.TICK)

    async def _probe(self) -> None:
        while True:
            changed = self._changed
            if not self.machine.wants_probe():
                await self._probe_asleep(changed)
                continue
            generation = self.machine.generation
            event, reason = await self._check_backends()
            if generation == self.machine.generation:  # else the answer is about an old state
                self.apply(event, reason)
            if self.machine.generation == generation:
                # nothing moved: wait for the interval (or a change that calls for a probe now)
                changed = self._changed
                with trio.move_on_after(self.cfg.probe_interval_s):
                    await changed.wait()

    async def _probe_asleep(self, changed: trio.Event) -> None:
        """Wait for a change, or run the slow probe of an ASLEEP node when it is due."""
        due = self.machine.next_asleep_probe()
        with trio.move_on_at(math.inf if due is None else due):
            await changed.wait()
            return
        generation = self.machine.generation
        event, reason = await self._check_backends()
        if generation == self.machine.generation and self.machine.state is State.ASLEEP:
            self.apply(Event.ASLEEP_PROBE_OK if event is Event.PROBE_OK
                       else Event.ASLEEP_PROBE_FAILED, reason)

    async def _check_backends(self) -> tuple[Event, str]:
        """All backends with held connections (else all of the node's) must be ready."""
        targets = [b for b in self.backends if self.held_by_port[b.port]] or list(self.backends)
        refused: list[str] = []
        for backend in sorted(targets, key=lambda b: b.port):
            try:
                reason = await check_ready(self.cfg.host, backend.port, backend.http_path,
                                           self.cfg.probe_timeout_s)
            except BackendUnavailable as exc:
                if exc.event is Event.PROBE_TIMEOUT:
                    return exc.event, exc.reason
                refused.append(exc.reason)
        if not targets:
            return Event.PROBE_REFUSED, "no route uses this node"
        if refused:
            return Event.PROBE_REFUSED, "; ".join(refused)
        return Event.PROBE_OK, reason

    # ---- applying events ---------------------------------------------------------------

    def apply(self, event: Event, reason: str = "") -> None:
        """Feed the machine one event now and carry out what it asks for."""
        before = (self.machine.generation, self.machine.demand)
        actions = self.machine.handle(event, trio.current_time(), reason)
        if self.history is not None:
            self.history.probe(event.value, reason, time.time())
        self._do(actions)
        if (self.machine.generation, self.machine.demand) != before:
            self._poke()

    def _do(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, SendPacket):
                self._packets_tx.send_nowait(None)
            elif isinstance(action, ReleaseHeld):
                self._finish_round(None)
            elif isinstance(action, FailHeld):
                self._finish_round(action.reason)
            elif isinstance(action, WakeFinished):
                self.metrics.wakes.labels(self.name, action.outcome).inc()
                if action.outcome == "ready":
                    self.metrics.wake_seconds.labels(self.name).observe(action.duration_s)
                else:
                    self.metrics.wake_failures.labels(self.name).inc()
                log.info("node %s: wake %s after %.3f s", self.name, action.outcome,
                         action.duration_s)
                if self.history is not None:
                    self.history.wake_finished(action.outcome, action.duration_s,
                                               self.machine.packets, time.time())
        self.metrics.set_state(self.name, self.machine.state)
        if self.history is not None:
            self.history.observe(self.machine.state.value, self.machine.packets,
                                 self.machine.reason, time.time())

    def _finish_round(self, failure: str | None) -> None:
        done, self._round = self._round, _Round()
        done.failure = failure
        done.done.set()

    def _poke(self) -> None:
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    def close(self, reason: str) -> None:
        """The node left the config: fail whatever is held for it."""
        self._finish_round(reason)

    # ---- what connections and the control endpoint call --------------------------------

    async def wait_awake(self) -> None:
        """Return once the node is AWAKE, starting the shared wake if needed.

        Raises ``WakeFailed`` if the wake times out, or at once while the cooldown after a
        failed wake lasts. The caller counts itself as held (see ``hold``) so limits and
        probes see it.
        """
        while self.machine.state is not State.AWAKE:
            current = self._round
            self.apply(Event.DEMAND)
            await current.done.wait()
            if current.failure is not None:
                raise WakeFailed(current.failure)

    def hold(self, port: int, model: str | None = None) -> None:
        """Count one connection held for ``port`` (and the model it asked for, if known)."""
        self.held += 1
        self.held_by_port[port] += 1
        if model is not None:
            self.held_by_model[model] += 1

    def unhold(self, port: int, model: str | None = None) -> None:
        self.held -= 1
        self.held_by_port[port] -= 1
        if model is not None:
            self.held_by_model[model] -= 1
            if self.held_by_model[model] <= 0:
                del self.held_by_model[model]
        if self.held == 0 and self.machine.demand:
            self.apply(Event.NO_DEMAND)

    def connect_failed(self, exc: BackendUnavailable, generation: int) -> None:
        """A relay's connect to the backend failed while the node was AWAKE at ``generation``."""
        if generation == self.machine.generation:
            self.apply(exc.event, exc.reason)

    def agent_event(self, kind: str, reason: str) -> None:
        """``resumed``, ``ready`` or ``suspended`` from the node's agent."""
        self.apply(_AGENT_EVENTS[kind], reason)

    def held_work(self) -> HeldWork:
        """What is held for this node now, most held first (a resuming agent starts it first)."""
        return HeldWork(self.name,
                        tuple(m for m, n in self.held_by_model.most_common() if n > 0),
                        tuple(p for p, n in self.held_by_port.most_common() if n > 0))

    def cooling_down(self) -> bool:
        """Whether a held connection would fail at once (a wake failed moments ago)."""
        return self.machine.cooldown_left(trio.current_time()) > 0

    def suspending(self) -> Verdict:
        before = self.machine.generation
        verdict = self.machine.suspending(trio.current_time(), self.active, self.held,
                                          self.cfg.veto_suspend_when_busy)
        self.metrics.set_state(self.name, self.machine.state)
        if self.machine.generation != before:
            self._poke()
        log.info("node %s: agent is suspending: %s (%s)", self.name,
                 "agreed" if verdict.allowed else "vetoed", verdict.reason)
        return verdict

    def wake_now(self, reason: str) -> None:
        self.apply(Event.WAKE_NOW, reason)

    def status(self) -> dict[str, Any]:
        now = trio.current_time()
        m = self.machine
        last = None
        if m.last_wake is not None:
            last = {"started_s_ago": round(now - m.last_wake.started, 3),
                    "duration_s": None if m.last_wake.duration_s is None
                    else round(m.last_wake.duration_s, 3),
                    "outcome": m.last_wake.outcome}
        return {"state": m.state.name, "reason": m.reason,
                "time_in_state_s": round(m.time_in_state(now), 3), "held": self.held,
                "active": self.active, "packets_sent": m.packets, "last_wake": last,
                "wake_cooldown_left_s": round(m.cooldown_left(now), 3),
                "last_packet_error": self.last_packet_error, "host": self.cfg.host,
                "mac": self.cfg.mac}
