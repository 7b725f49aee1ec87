"""The wake state machine, pure: events and `now` in, actions and states out."""

from __future__ import annotations

import logging

import pytest

from edge_proxy.errors import IllegalWakeTransition
from edge_proxy.wake.machine import (
    Event,
    FailHeld,
    ReleaseHeld,
    SendPacket,
    State,
    WakeFinished,
    WakeMachine,
    WakeTiming,
)

TIMING = WakeTiming(wol_interval_s=2.0, wake_timeout_s=30.0, drain_timeout_s=60.0)


def machine(state: State = State.UNKNOWN, now: float = 100.0) -> WakeMachine:
    m = WakeMachine("box", TIMING, now)
    if state is State.ASLEEP:
        m.handle(Event.PROBE_TIMEOUT, now, "connect timed out")
    elif state is State.AWAKE:
        m.handle(Event.PROBE_OK, now)
    elif state is State.WAKING:
        m.handle(Event.PROBE_TIMEOUT, now, "connect timed out")
        m.handle(Event.DEMAND, now)
    elif state is State.DRAINING:
        m.handle(Event.PROBE_OK, now)
        assert m.suspending(now, in_flight=0, held=0, veto_when_busy=True).allowed
    assert m.state is state
    return m


def test_first_probe_decides_unknown() -> None:
    assert machine().wants_probe()
    m = machine()
    assert m.handle(Event.PROBE_OK, 100.5) == [ReleaseHeld()]
    assert m.state is State.AWAKE and not m.wants_probe()
    m = machine()
    assert m.handle(Event.PROBE_TIMEOUT, 100.5, "connect timed out") == []
    assert m.state is State.ASLEEP and not m.wants_probe()


def test_held_connection_starts_a_wake_with_a_packet_at_once_then_one_per_interval() -> None:
    m = machine(State.ASLEEP, now=100.0)
    assert m.handle(Event.DEMAND, 101.0) == [SendPacket()]
    assert m.state is State.WAKING and m.wants_probe()
    assert m.next_deadline() == 103.0
    assert m.handle(Event.DEMAND, 101.5) == []  # more clients: the same wake
    assert m.handle(Event.TICK, 102.9) == []
    assert m.handle(Event.TICK, 103.0) == [SendPacket()]
    assert m.handle(Event.PROBE_REFUSED, 104.0, "refused") == []  # up, not ready: keep waking
    assert m.handle(Event.TICK, 105.0) == [SendPacket()]
    assert m.packets == 3
    actions = m.handle(Event.PROBE_OK, 106.0, "GET /health answered 200")
    assert actions == [WakeFinished("ready", 5.0), ReleaseHeld()]
    assert m.state is State.AWAKE
    assert m.last_wake is not None and m.last_wake.duration_s == 5.0


def test_packets_over_a_wake_are_bounded_by_time_not_by_events() -> None:
    m = machine(State.ASLEEP, now=0.0)
    sent = 0
    for step in range(1000):  # 1000 demands and ticks over 10 s
        now = step / 100
        sent += sum(isinstance(a, SendPacket) for a in m.handle(Event.DEMAND, now))
        sent += sum(isinstance(a, SendPacket) for a in m.handle(Event.TICK, now))
    assert sent == 5  # t = 0, 2, 4, 6, 8


def test_wake_timeout_fails_held_and_goes_back_to_asleep() -> None:
    m = machine(State.WAKING, now=0.0)
    actions = m.handle(Event.TICK, 30.0)
    assert actions == [WakeFinished("timeout", 30.0),
                       FailHeld("wake timed out after 30 s")]
    assert m.state is State.ASLEEP and not m.demand


def test_failed_connect_to_an_awake_backend_starts_a_wake() -> None:
    m = machine(State.AWAKE)
    assert m.handle(Event.PROBE_REFUSED, 101.0, "connect refused") == [SendPacket()]
    assert m.state is State.WAKING and m.reason == "connect refused"


def test_suspending_is_vetoed_while_busy_and_drains_when_idle() -> None:
    m = machine(State.AWAKE)
    verdict = m.suspending(101.0, in_flight=2, held=0, veto_when_busy=True)
    assert not verdict.allowed and "2 connection(s) open" in verdict.reason
    assert m.state is State.AWAKE
    assert m.suspending(101.0, in_flight=2, held=0, veto_when_busy=False).allowed
    assert m.state is State.DRAINING
    # a client arriving while draining is held; the backend answering is not enough
    assert m.handle(Event.DEMAND, 102.0) == []
    assert m.wants_probe()
    assert m.handle(Event.PROBE_OK, 103.0) == []
    assert m.state is State.DRAINING
    # the host goes to sleep: connect times out, and the held client starts the wake
    assert m.handle(Event.PROBE_TIMEOUT, 104.0, "connect timed out") == [SendPacket()]
    assert m.state is State.WAKING


def test_a_client_held_while_the_service_stops_for_a_suspend_starts_the_wake() -> None:
    m = machine(State.AWAKE)
    assert m.suspending(101.0, in_flight=0, held=0, veto_when_busy=True).allowed
    assert m.handle(Event.PROBE_REFUSED, 101.5, "connect refused") == []  # nobody waits yet
    assert m.state is State.DRAINING and not m.wants_probe()
    m.handle(Event.DEMAND, 102.0)
    # llama-server is stopped, the host still answers: packets go out until it sleeps and wakes
    assert m.handle(Event.PROBE_REFUSED, 102.1, "connect refused") == [SendPacket()]
    assert m.state is State.WAKING and "goes to sleep" in m.reason
    assert m.handle(Event.TICK, 102.1 + TIMING.wol_interval_s) == [SendPacket()]  # and again


def test_held_connections_veto_suspend_even_when_allowed_busy() -> None:
    m = machine(State.WAKING)
    assert not m.suspending(101.0, in_flight=0, held=1, veto_when_busy=False).allowed


def test_drain_without_suspend_times_out_to_unknown() -> None:
    m = machine(State.DRAINING, now=0.0)
    assert m.next_deadline() == 60.0
    m.handle(Event.TICK, 59.0)
    assert m.state is State.DRAINING
    m.handle(Event.TICK, 60.0)
    assert m.state is State.UNKNOWN and m.wants_probe()


def test_agent_ready_releases_from_any_state_and_resumed_waits_for_probes() -> None:
    for state in (State.UNKNOWN, State.ASLEEP, State.WAKING, State.DRAINING):
        m = machine(state)
        assert ReleaseHeld() in m.handle(Event.AGENT_READY, 101.0, "instances ready")
        assert m.state is State.AWAKE
    m = machine(State.ASLEEP)
    assert m.handle(Event.AGENT_RESUMED, 101.0, "resumed") == []  # the host is up: no packet
    assert m.state is State.WAKING and m.wants_probe()


def test_operator_wake_sends_in_every_state() -> None:
    for state in State:
        m = machine(state)
        assert SendPacket() in m.handle(Event.WAKE_NOW, 101.0, "cli")
    m = machine(State.ASLEEP)
    m.handle(Event.WAKE_NOW, 101.0, "cli")
    assert m.state is State.WAKING


def test_illegal_moves_name_state_and_event() -> None:
    with pytest.raises(IllegalWakeTransition, match="probe_ok is not allowed in state ASLEEP"):
        machine(State.ASLEEP).handle(Event.PROBE_OK, 101.0)
    with pytest.raises(IllegalWakeTransition, match="demand is not allowed in state AWAKE"):
        machine(State.AWAKE).handle(Event.DEMAND, 101.0)


def test_every_transition_is_logged_with_its_reason(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edge_proxy.wake.machine")
    m = machine(State.ASLEEP)
    m.handle(Event.DEMAND, 101.0)
    m.handle(Event.PROBE_OK, 102.0, "GET /health answered 200")
    lines = [r.getMessage() for r in caplog.records]
    assert "node box: ASLEEP -> WAKING (connection held while asleep)" in lines
    assert "node box: WAKING -> AWAKE (GET /health answered 200)" in lines
    assert "WAKING" in repr(m) or "AWAKE" in repr(m)


COOLDOWN = WakeTiming(wol_interval_s=2.0, wake_timeout_s=30.0, drain_timeout_s=60.0,
                      wake_cooldown_s=20.0)


def failed_wake(timing: WakeTiming = COOLDOWN, refused: str = "") -> WakeMachine:
    """A machine whose wake started at 0 and timed out at 30."""
    m = WakeMachine("gpubox", timing, 0.0)
    m.handle(Event.PROBE_TIMEOUT, 0.0, "connect timed out")
    m.handle(Event.DEMAND, 0.0)
    if refused:
        m.handle(Event.PROBE_REFUSED, 10.0, refused)
    assert FailHeld("wake timed out after 30 s") in m.handle(Event.TICK, 30.0)
    m.handle(Event.NO_DEMAND, 30.0)
    assert m.state is State.ASLEEP
    return m


def test_after_a_failed_wake_new_demand_fails_at_once_until_the_cooldown_ends() -> None:
    m = failed_wake()
    packets = m.packets
    assert m.cooldown_left(42.0) == 8.0
    assert m.handle(Event.DEMAND, 42.0) == [FailHeld(
        "wake of gpubox failed 12 s ago (no answer within 30 s); not retrying for another 8 s")]
    assert m.state is State.ASLEEP and not m.demand and m.packets == packets
    assert m.handle(Event.DEMAND, 49.9) != [SendPacket()]  # still cooling down
    assert m.handle(Event.DEMAND, 50.0) == [SendPacket()]  # over: a new wake
    assert m.state is State.WAKING and m.cooldown_left(50.0) == 0.0


def test_the_cooldown_error_says_what_the_probes_saw() -> None:
    m = failed_wake(refused="GET /health answered 503")
    (fail,) = m.handle(Event.DEMAND, 31.0)
    assert isinstance(fail, FailHeld)
    assert fail.reason == ("wake of gpubox failed 1 s ago (not ready within 30 s: GET /health "
                           "answered 503); not retrying for another 19 s")


def test_signs_of_life_end_the_cooldown() -> None:
    m = failed_wake()
    assert m.handle(Event.WAKE_NOW, 31.0, "cli") == [SendPacket()]  # an operator insists
    assert m.state is State.WAKING and m.cooldown_left(31.0) == 0.0
    m = failed_wake()
    m.handle(Event.AGENT_RESUMED, 31.0, "resumed")
    assert m.state is State.WAKING and m.handle(Event.DEMAND, 31.5) == []  # joins that wake


def test_without_a_cooldown_the_next_demand_wakes_again() -> None:
    m = failed_wake(TIMING)
    assert m.handle(Event.DEMAND, 30.1) == [SendPacket()]
    assert m.state is State.WAKING


def test_suspending_is_vetoed_while_a_wake_is_in_flight_even_with_nobody_held() -> None:
    m = machine(State.ASLEEP)
    m.handle(Event.WAKE_NOW, 101.0, "cli")
    verdict = m.suspending(104.0, in_flight=0, held=0, veto_when_busy=False)
    assert not verdict.allowed and verdict.reason == "a wake is in flight (started 3 s ago)"
    assert m.state is State.WAKING


def test_agent_suspended_makes_the_node_asleep_at_once() -> None:
    m = machine(State.DRAINING)
    assert m.handle(Event.AGENT_SUSPENDED, 101.0, "running the suspend command") == []
    assert m.state is State.ASLEEP and not m.wants_probe()
    assert m.reason == "agent suspended: running the suspend command"
    assert m.next_deadline() is None  # no drain_timeout_s wait
    m = machine(State.DRAINING)
    m.handle(Event.DEMAND, 100.5)  # a client held while draining wakes it again
    assert m.handle(Event.AGENT_SUSPENDED, 101.0, "suspend") == [SendPacket()]
    assert m.state is State.WAKING
    m = machine(State.AWAKE)  # the proxy missed `suspending` (restarted, unreachable)
    m.handle(Event.AGENT_SUSPENDED, 101.0, "suspend")
    assert m.state is State.ASLEEP
    m = machine(State.WAKING)  # held clients: the packets going out wake it
    assert m.handle(Event.AGENT_SUSPENDED, 101.0, "suspend") == []
    assert m.state is State.WAKING


def test_an_asleep_node_is_probed_slowly_and_seen_up_without_a_packet() -> None:
    slow = WakeTiming(wol_interval_s=2.0, wake_timeout_s=30.0, drain_timeout_s=60.0,
                      asleep_probe_interval_s=60.0)
    m = WakeMachine("box", slow, 100.0)
    assert m.next_asleep_probe() is None  # UNKNOWN: the normal probes run
    m.handle(Event.PROBE_TIMEOUT, 100.0, "connect timed out")
    assert m.state is State.ASLEEP and not m.wants_probe()
    assert m.next_asleep_probe() == 160.0
    assert m.handle(Event.ASLEEP_PROBE_FAILED, 160.5, "connect timed out") == []
    assert m.state is State.ASLEEP and m.next_asleep_probe() == 220.5
    # someone switched the box on by hand: the next slow probe sees it ready
    assert m.handle(Event.ASLEEP_PROBE_OK, 220.6, "GET /health answered 200") == [ReleaseHeld()]
    assert m.state is State.AWAKE and m.packets == 0
    assert m.next_asleep_probe() is None
    # the slow probe is an ASLEEP thing only
    with pytest.raises(IllegalWakeTransition, match="asleep_probe_ok is not allowed in state AWAKE"):
        m.handle(Event.ASLEEP_PROBE_OK, 221.0)


def test_without_an_interval_an_asleep_node_is_never_probed() -> None:
    m = machine(State.ASLEEP)
    assert m.next_asleep_probe() is None
