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


def test_events_may_carry_the_nodes_models() -> None:
    event = NodeEvent("ready", "gpubox", "qwen READY", ("qwen", "llama"))
    assert decode_event(event.encode()) == event
    assert b'"models"' not in NodeEvent("ready", "gpubox").encode()  # older proxies take it
    assert decode_event({"event": "ready", "node": "n", "models": None}).models is None
    assert decode_event({"event": "models", "node": "n", "models": []}).models == ()
    # a repeated id is listed once
    assert decode_event({"event": "ready", "node": "n", "models": ["a", "a"]}).models == ("a",)


@pytest.mark.parametrize(("models", "message"), [
    ("qwen", "models: found str; expected a list of model ids"),
    ([1], "models[0]: found 1; expected a non-empty one-line string"),
    ([""], "models[0]: found ''"),
    (["a\nb"], "models[0]: found 'a\\\\nb'"),
    (["m"] * 300, "models: 300 ids; at most 256 allowed"),
    (["x" * 600], "models[0]: 600 characters; at most 512 allowed"),
])
def test_bad_model_lists_name_the_field(models: object, message: str) -> None:
    with pytest.raises(EventError, match="^" + message.replace("[", r"\[")):
        decode_event({"event": "ready", "node": "n", "models": models})


def test_a_models_event_lists_models() -> None:
    with pytest.raises(EventError, match=r"^models: missing"):
        decode_event({"event": "models", "node": "n"})


def test_an_unloading_event_names_the_instances_about_to_stop() -> None:
    event = NodeEvent("unloading", "n", "idle for ttl 600 s", ("a", "b"), ("inst-a",))
    assert decode_event(event.encode()) == event
    with pytest.raises(EventError, match="unloading: an unloading event, and only one"):
        decode_event({"event": "unloading", "node": "n"})
    with pytest.raises(EventError, match="unloading: an unloading event, and only one"):
        decode_event({"event": "ready", "node": "n", "unloading": ["inst-a"]})
    with pytest.raises(EventError, match=r"unloading\[0\]"):
        decode_event({"event": "unloading", "node": "n", "unloading": [""]})
