"""The agent↔proxy event schema in shared/events.py: both directions, strict validation."""

from __future__ import annotations

import pytest

from shared.events import EventError, EventReply, NodeEvent, decode_event, decode_reply


def test_events_and_replies_round_trip() -> None:
    for kind in ("suspending", "resumed", "ready"):
        event = NodeEvent(kind, "gpubox", "idle for 900 s")
        assert decode_event(event.encode()) == event
    reply = EventReply("gpubox", False, "AWAKE", in_flight=3, held=0, reason="3 connection(s) open")
    assert decode_reply(reply.encode()) == reply
    assert decode_event('{"event": "ready", "node": "n"}') == NodeEvent("ready", "n", "")


@pytest.mark.parametrize(("raw", "message"), [
    (b"{", "not valid JSON"),
    (b"[]", "found list; expected a JSON object"),
    (b'{"event": "sleep", "node": "n"}', "event: found 'sleep'; allowed: suspending, resumed, ready"),
    (b'{"node": "n"}', "event: found None"),
    (b'{"event": "ready"}', "node: found None; expected a non-empty string"),
    (b'{"event": "ready", "node": ""}', "node: found ''"),
    (b'{"event": "ready", "node": 5}', "node: found 5"),
    (b'{"event": "ready", "node": "n", "why": "x"}', "why: unknown field"),
    (b'{"event": "ready", "node": "n", "reason": 1}', "reason: found 1"),
])
def test_bad_events_name_the_field(raw: bytes, message: str) -> None:
    with pytest.raises(EventError, match="^" + message.replace("[", r"\[").replace("(", r"\(")):
        decode_event(raw)


@pytest.mark.parametrize(("change", "message"), [
    ({"allowed": "yes"}, "allowed: found 'yes'; expected true or false"),
    ({"in_flight": -1}, "in_flight: found -1; expected a count >= 0"),
    ({"held": True}, "held: found True"),
    ({"state": ""}, "state: found ''"),
])
def test_bad_replies_name_the_field(change: dict[str, object], message: str) -> None:
    good = {"node": "n", "allowed": True, "state": "AWAKE", "in_flight": 0, "held": 0}
    with pytest.raises(EventError, match="^" + message):
        decode_reply({**good, **change})
