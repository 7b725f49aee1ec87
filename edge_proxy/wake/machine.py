"""The wake state machine of one node: pure decisions, time passed in, no I/O.

States::

    UNKNOWN   just started; the first readiness probe decides
    AWAKE     the backend is ready: connections are relayed at once
    DRAINING  the node's agent said `suspending` and the proxy agreed: relays already open go
              on, new connections are held (they would reach a dying backend)
    ASLEEP    unreachable (connect timed out: no ARP answer), suspended (the agent said
              `suspended` as it ran the suspend command), or not serving
    WAKING    connections are held; magic packets go out at once and every `wol_interval_s`
              until a readiness probe passes (or the agent says `ready`) or
              `wake_timeout_s` passes

Probe outcomes are three: ``PROBE_OK`` (readiness passed), ``PROBE_REFUSED`` (the host
answered but the service is not ready: connection refused, or HTTP not 200 while
llama-server loads) and ``PROBE_TIMEOUT`` (no answer: a sleeping host has no ARP reply, so
connect times out). A refused connection proves the host is up, so it never makes a node
ASLEEP while a wake is running; magic packets continue anyway (a NIC that is up ignores
them, and the host may be on its way down).

An ASLEEP node is probed at a slow interval (``asleep_probe_interval_s``; a connect does not
wake a sleeping NIC, only a magic packet does): one that passes (``ASLEEP_PROBE_OK``) came up
by itself or by hand and is AWAKE, so polls and requests reach it without a wake;
``ASLEEP_PROBE_FAILED`` only schedules the next one.

A wake that times out starts a cooldown of ``wake_cooldown_s``: while it lasts, a new held
connection fails at once with the same error (saying how long ago and for how much longer)
instead of starting a second wake; frontends fire follow-up requests right after the user saw
the error, and a wake that just failed is unlikely to work a few seconds later. Anything that
shows the node alive (an agent event, an operator's wake) ends the cooldown.

``WakeMachine.handle(event, now)`` applies one event and returns the actions for the trio
driver (send a packet, release held connections, fail them). Every transition is logged as
``node: OLD -> NEW (reason)``; a move the table does not allow raises ``IllegalWakeTransition``
naming the state and the event. The driver guarantees it never feeds a stale probe result
(see ``generation``).
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from edge_proxy.errors import IllegalWakeTransition

log = logging.getLogger(__name__)


class State(enum.Enum):
    UNKNOWN = "UNKNOWN"
    AWAKE = "AWAKE"
    DRAINING = "DRAINING"
    ASLEEP = "ASLEEP"
    WAKING = "WAKING"


class Event(enum.Enum):
    DEMAND = "demand"  # a connection is now held for this node
    NO_DEMAND = "no_demand"  # the last held connection left (or was released)
    PROBE_OK = "probe_ok"
    PROBE_REFUSED = "probe_refused"
    PROBE_TIMEOUT = "probe_timeout"
    TICK = "tick"  # time passed: resend packets, check deadlines
    AGENT_RESUMED = "resumed"
    AGENT_READY = "ready"
    AGENT_SUSPENDED = "suspended"  # the agent is running the suspend command now
    WAKE_NOW = "wake_now"  # an operator asked for a magic packet now
    ASLEEP_PROBE_OK = "asleep_probe_ok"  # the slow probe of an ASLEEP node passed
    ASLEEP_PROBE_FAILED = "asleep_probe_failed"  # it did not: still asleep (or not serving)


@dataclass(frozen=True)
class SendPacket:
    """Send one magic packet to the node now."""


@dataclass(frozen=True)
class ReleaseHeld:
    """The backend is ready: held connections go now."""


@dataclass(frozen=True)
class FailHeld:
    """The wake timed out: close every held connection."""

    reason: str


@dataclass(frozen=True)
class WakeFinished:
    """A wake (entry into WAKING) ended; for logs and metrics."""

    outcome: str  # "ready" or "timeout"
    duration_s: float


Action = SendPacket | ReleaseHeld | FailHeld | WakeFinished


@dataclass(frozen=True)
class WakeTiming:
    wol_interval_s: float
    wake_timeout_s: float
    drain_timeout_s: float
    wake_cooldown_s: float = 0.0  # after a failed wake, held connections fail at once
    asleep_probe_interval_s: float = 0.0  # probe an ASLEEP node this often (0: never)


@dataclass(frozen=True)
class FailedWake:
    """The last wake that timed out: when, and what the probes saw."""

    at: float
    detail: str  # "no answer within 60 s" or "not ready within 60 s: GET /health answered 503"


@dataclass(frozen=True)
class Verdict:
    """The answer to an agent's `suspending`."""

    allowed: bool
    reason: str


@dataclass
class LastWake:
    started: float
    duration_s: float | None = None
    outcome: str | None = None


@dataclass
class WakeMachine:
    """One node's wake state. All times are seconds on one monotonic clock, given by the caller."""

    name: str
    timing: WakeTiming
    now: float
    state: State = State.UNKNOWN
    reason: str = "started"
    demand: bool = False  # held connections exist
    generation: int = 0  # bumped on every transition; probe results from an older one are stale
    last_wake: LastWake | None = None
    packets: int = 0
    _since: float = field(init=False)
    _wake_started: float = field(init=False, default=0.0)
    _next_packet: float = field(init=False, default=0.0)
    _deadline: float = field(init=False, default=0.0)
    _slot: int = field(init=False, default=0)  # packets of this wake are due at start + slot * interval
    _failed: FailedWake | None = field(init=False, default=None)  # set only while ASLEEP after it
    _refused: str = field(init=False, default="")  # the last "up, not ready" probe of this wake
    _next_asleep_probe: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        self._since = self.now

    def __repr__(self) -> str:
        return (f"<WakeMachine {self.name} {self.state.name} since={self._since:.3f} "
                f"demand={self.demand} reason={self.reason!r}>")

    def time_in_state(self, now: float) -> float:
        return max(0.0, now - self._since)

    @property
    def since(self) -> float:
        return self._since

    def next_deadline(self) -> float | None:
        """When ``TICK`` next has something to do (None: nothing is scheduled)."""
        if self.state is State.WAKING:
            return min(self._next_packet, self._deadline)
        if self.state is State.DRAINING:
            return self._since + self.timing.drain_timeout_s
        return None

    def cooldown_left(self, now: float) -> float:
        """Seconds until a held connection may start a wake again (0: it may now)."""
        if self._failed is None:
            return 0.0
        return max(0.0, self._failed.at + self.timing.wake_cooldown_s - now)

    def cooldown_error(self, now: float) -> str:
        """The one line a connection refused during the cooldown is closed with."""
        assert self._failed is not None
        return (f"wake of {self.name} failed {now - self._failed.at:.0f} s ago "
                f"({self._failed.detail}); not retrying for another "
                f"{math.ceil(self.cooldown_left(now)):.0f} s")

    def next_asleep_probe(self) -> float | None:
        """When the slow probe of an ASLEEP node is due (None: not ASLEEP, or never)."""
        if self.state is not State.ASLEEP or self.timing.asleep_probe_interval_s <= 0:
            return None
        return self._next_asleep_probe

    def wants_probe(self) -> bool:
        """Whether the driver should run readiness probes now."""
        if self.state in (State.UNKNOWN, State.WAKING):
            return True
        return self.state is State.DRAINING and self.demand

    # ---- events --------------------------------------------------------------------------

    def handle(self, event: Event, now: float, reason: str = "") -> list[Action]:
        """Apply ``event`` at time ``now``; return what the driver must do."""
        handler = _TABLE.get((self.state, event))
        if handler is None:
            raise IllegalWakeTransition(self.name, self.state, event)
        actions: list[Action] = []
        handler(self, now, reason or event.value, actions)
        return actions

    def suspending(self, now: float, in_flight: int, held: int, veto_when_busy: bool) -> Verdict:
        """The agent asks to suspend: agree (→ DRAINING) or veto, and say why."""
        if held > 0:
            return Verdict(False, f"{held} connection(s) held, waiting for the node")
        if self.state is State.WAKING:
            # A wake in flight means someone wants the node (or a client just left while it
            # woke); suspending now would kill the instances it is starting.
            return Verdict(False, f"a wake is in flight (started {now - self._wake_started:.0f} s "
                                  "ago)")
        if veto_when_busy and in_flight > 0:
            return Verdict(False, f"{in_flight} connection(s) open")
        if self.state is not State.DRAINING:
            self._move(State.DRAINING, now, "agent is suspending")
        why = f"{in_flight} connection(s) open, allowed by config" if in_flight else "no connections open"
        return Verdict(True, why)

    # ---- transitions (the table below names which runs where) ----------------------------

    def _move(self, new: State, now: float, reason: str) -> None:
        log.info("node %s: %s -> %s (%s)", self.name, self.state.name, new.name, reason)
        self.state = new
        self.reason = reason
        self._since = now
        self.generation += 1
        self._failed = None  # any move after a failed wake ends its cooldown
        if new is State.ASLEEP:
            self._next_asleep_probe = now + self.timing.asleep_probe_interval_s

    def _start_wake(self, now: float, reason: str, actions: list[Action], *, packet: bool) -> None:
        self._move(State.WAKING, now, reason)
        self._wake_started = now
        self._deadline = now + self.timing.wake_timeout_s
        self.last_wake = LastWake(started=now)
        self._slot = 0
        self._refused = ""
        if packet:
            self._send(now, actions)
        else:
            self._slot = 1
            self._next_packet = now + self.timing.wol_interval_s

    def _send(self, now: float, actions: list[Action]) -> None:
        actions.append(SendPacket())
        self.packets += 1
        # packets keep to the grid start + n * interval (no drift); a late tick skips slots
        interval = self.timing.wol_interval_s
        self._slot += 1
        self._next_packet = self._wake_started + self._slot * interval
        if self._next_packet <= now:
            self._slot = int((now - self._wake_started) // interval) + 1
            self._next_packet = self._wake_started + self._slot * interval

    def _finish_wake(self, now: float, outcome: str, actions: list[Action]) -> None:
        duration = now - self._wake_started
        if self.last_wake is not None:
            self.last_wake.duration_s = duration
            self.last_wake.outcome = outcome
        actions.append(WakeFinished(outcome, duration))

    def _awake(self, now: float, reason: str, actions: list[Action]) -> None:
        if self.state is State.WAKING:
            self._finish_wake(now, "ready", actions)
        self._move(State.AWAKE, now, reason)
        self.demand = False
        actions.append(ReleaseHeld())

    def _on_demand(self, now: float, reason: str, actions: list[Action]) -> None:
        if self.state is State.ASLEEP and self.cooldown_left(now) > 0:
            actions.append(FailHeld(self.cooldown_error(now)))
            return
        self.demand = True
        if self.state is State.ASLEEP:
            self._start_wake(now, "connection held while asleep", actions, packet=True)

    def _on_no_demand(self, now: float, reason: str, actions: list[Action]) -> None:
        self.demand = False

    def _nothing(self, now: float, reason: str, actions: list[Action]) -> None:
        pass

    def _on_refused_waking(self, now: float, reason: str, actions: list[Action]) -> None:
        self._refused = reason  # up, not ready: keep waiting, remember why for a failure

    def _on_ok(self, now: float, reason: str, actions: list[Action]) -> None:
        if self.state is State.DRAINING:
            if self.time_in_state(now) < self.timing.drain_timeout_s:
                return  # the backend is still up because the agent is only now stopping it
            reason = "no suspend followed within drain_timeout_s; backend ready"
        self._awake(now, reason, actions)

    def _on_refused(self, now: float, reason: str, actions: list[Action]) -> None:
        self._not_ready(now, reason, actions, unreachable=False)

    def _on_timeout(self, now: float, reason: str, actions: list[Action]) -> None:
        self._not_ready(now, reason, actions, unreachable=True)

    def _not_ready(self, now: float, reason: str, actions: list[Action], *, unreachable: bool) -> None:
        """PROBE_REFUSED or PROBE_TIMEOUT outside WAKING."""
        if self.state is State.AWAKE:
            # a relay could not reach the backend; its connection is held from now on
            self.demand = True
            self._start_wake(now, reason, actions, packet=True)
        elif self.state is State.UNKNOWN:
            if self.demand:
                self._start_wake(now, reason, actions, packet=True)
            else:
                self._move(State.ASLEEP, now, reason)
        elif self.state is State.DRAINING and unreachable:
            self._move(State.ASLEEP, now, "host went to sleep: " + reason)
            if self.demand:
                self._start_wake(now, "connection held while asleep", actions, packet=True)
        elif self.state is State.DRAINING and self.demand:
            # The agent has stopped the service and the host is on its way down. Start the
            # wake now: packets repeat every wol_interval_s, the first one that reaches the
            # sleeping NIC wakes it (one that arrives too early is ignored by a NIC still up).
            self._start_wake(now, "connection held while the node goes to sleep: " + reason,
                             actions, packet=True)

    def _on_tick(self, now: float, reason: str, actions: list[Action]) -> None:
        if self.state is State.WAKING:
            if now >= self._deadline:
                self._finish_wake(now, "timeout", actions)
                timeout = self.timing.wake_timeout_s
                why = f"wake timed out after {timeout:g} s"
                self._move(State.ASLEEP, now, why)
                self.demand = False
                detail = (f"not ready within {timeout:g} s: {self._refused}" if self._refused
                          else f"no answer within {timeout:g} s")
                self._failed = FailedWake(now, detail)
                actions.append(FailHeld(why))
            elif now >= self._next_packet:
                self._send(now, actions)
        elif (self.state is State.DRAINING
              and self.time_in_state(now) >= self.timing.drain_timeout_s):
            self._move(State.UNKNOWN, now, "no suspend followed within drain_timeout_s")

    def _on_resumed(self, now: float, reason: str, actions: list[Action]) -> None:
        if self.state in (State.ASLEEP, State.DRAINING, State.UNKNOWN):
            # the host is up, so no packet is needed; probes find the service when it is ready
            self._start_wake(now, "agent resumed: " + reason, actions, packet=False)

    def _on_suspended(self, now: float, reason: str, actions: list[Action]) -> None:
        # The suspend command is running: the node is asleep now, whatever probes would say
        # (on loopback, or where the service stops before the host, they would be refused).
        if self.state in (State.AWAKE, State.DRAINING, State.UNKNOWN):
            self._move(State.ASLEEP, now, "agent suspended: " + reason)
            if self.demand:
                self._start_wake(now, "connection held while asleep", actions, packet=True)
        # ASLEEP: nothing new. WAKING: connections are held; the packets going out wake it.

    def _on_ready(self, now: float, reason: str, actions: list[Action]) -> None:
        if self.state is not State.AWAKE:
            self._awake(now, "agent ready: " + reason, actions)

    def _on_asleep_probe_ok(self, now: float, reason: str, actions: list[Action]) -> None:
        self._awake(now, "seen up while asleep: " + reason, actions)

    def _on_asleep_probe_failed(self, now: float, reason: str, actions: list[Action]) -> None:
        self._next_asleep_probe = now + self.timing.asleep_probe_interval_s

    def _on_wake_now(self, now: float, reason: str, actions: list[Action]) -> None:
        if self.state in (State.ASLEEP, State.UNKNOWN):
            self._start_wake(now, "wake requested: " + reason, actions, packet=True)
        else:  # AWAKE, WAKING, DRAINING: send as asked, keep the state
            self._send(now, actions)


Step = Callable[[WakeMachine, float, str, list[Action]], None]

_S, _E = State, Event
_ANY = tuple(State)
_TABLE: dict[tuple[State, Event], Step] = {}
for _state in _ANY:
    _TABLE[_state, _E.NO_DEMAND] = WakeMachine._on_no_demand
    _TABLE[_state, _E.TICK] = WakeMachine._on_tick
    _TABLE[_state, _E.AGENT_RESUMED] = WakeMachine._on_resumed
    _TABLE[_state, _E.AGENT_READY] = WakeMachine._on_ready
    _TABLE[_state, _E.AGENT_SUSPENDED] = WakeMachine._on_suspended
    _TABLE[_state, _E.WAKE_NOW] = WakeMachine._on_wake_now
# A connection is held only when the node is not AWAKE (an AWAKE node gets a connect first).
for _state in (_S.UNKNOWN, _S.ASLEEP, _S.WAKING, _S.DRAINING):
    _TABLE[_state, _E.DEMAND] = WakeMachine._on_demand
# Probes run in UNKNOWN, WAKING and DRAINING; in AWAKE the relays' own connects report.
# Nothing probes an ASLEEP node (it would not answer): a result there is a driver bug.
for _state in (_S.UNKNOWN, _S.AWAKE, _S.DRAINING, _S.WAKING):
    _TABLE[_state, _E.PROBE_OK] = WakeMachine._on_ok
for _state in (_S.UNKNOWN, _S.AWAKE, _S.DRAINING):
    _TABLE[_state, _E.PROBE_REFUSED] = WakeMachine._on_refused
    _TABLE[_state, _E.PROBE_TIMEOUT] = WakeMachine._on_timeout
_TABLE[_S.WAKING, _E.PROBE_REFUSED] = WakeMachine._on_refused_waking  # keep waiting
# The slow probe runs only while ASLEEP; the driver drops a result once the state moved.
_TABLE[_S.ASLEEP, _E.ASLEEP_PROBE_OK] = WakeMachine._on_asleep_probe_ok
_TABLE[_S.ASLEEP, _E.ASLEEP_PROBE_FAILED] = WakeMachine._on_asleep_probe_failed
_TABLE[_S.WAKING, _E.PROBE_TIMEOUT] = WakeMachine._nothing
