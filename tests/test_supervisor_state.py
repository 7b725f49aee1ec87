"""The pure parts of supervision: the transition table and the restart policy (time stepped)."""

from __future__ import annotations

from pathlib import Path

import pytest

from inference_node.errors import IllegalInstanceTransition
from inference_node.supervisor.output import LogRing
from inference_node.supervisor.state import (
    Action,
    RestartTracker,
    State,
    check_transition,
    describe_exit,
)
from shared.config.loader import Context, build
from shared.config.node import RestartConfig


def policy(**table: object) -> RestartConfig:
    return build(RestartConfig, table, Context(Path("x.toml")), "instances.a.restart")


def test_illegal_transition_names_both_states() -> None:
    check_transition(State.STOPPED, State.STARTING)
    with pytest.raises(IllegalInstanceTransition, match="instance state STOPPED cannot move to READY"):
        check_transition(State.STOPPED, State.READY)


def test_backoff_doubles_then_caps_then_fails() -> None:
    tracker = RestartTracker(policy(backoff_initial_s=0.5, backoff_max_s=3, max_restarts=4,
                                    window_s=100))
    delays = [tracker.on_exit(float(t), 1, "exited with code 1") for t in range(5)]
    assert [d.action for d in delays] == [Action.RESTART] * 4 + [Action.FAIL]
    assert [d.delay_s for d in delays[:4]] == [0.5, 1.0, 2.0, 3.0]
    assert delays[0].reason == "exited with code 1; restart 1 in 0.5 s"
    assert "crashed 5 times within 100 s (restart.max_restarts = 4)" in delays[4].reason


def test_crashes_outside_the_window_are_forgotten() -> None:
    tracker = RestartTracker(policy(max_restarts=1, window_s=10))
    assert tracker.on_exit(0.0, 1, "x").action is Action.RESTART
    assert tracker.on_exit(11.0, 1, "x").action is Action.RESTART  # the first left the window
    assert tracker.on_exit(12.0, 1, "x").action is Action.FAIL
    tracker.reset()
    assert tracker.on_exit(13.0, 1, "x").action is Action.RESTART


@pytest.mark.parametrize(("name", "code", "action"), [
    ("on-failure", 0, Action.STOP),
    ("on-failure", 2, Action.RESTART),
    ("on-failure", None, Action.RESTART),  # never became healthy
    ("always", 0, Action.RESTART),
    ("never", 2, Action.FAIL),
    ("never", 0, Action.STOP),
])
def test_policies(name: str, code: int | None, action: Action) -> None:
    assert RestartTracker(policy(policy=name)).on_exit(0.0, code, "x").action is action


def test_describe_exit() -> None:
    assert describe_exit(3) == "exited with code 3"
    assert describe_exit(-9) == "killed by SIGKILL"
    assert describe_exit(-200) == "killed by signal 200"


def test_log_ring_is_bounded_and_resizable() -> None:
    ring = LogRing(3)
    for i in range(5):
        ring.append("stdout", str(i))
    assert [line.text for line in ring.tail(10)] == ["2", "3", "4"]
    assert [line.text for line in ring.tail(1)] == ["4"] and ring.tail(0) == []
    ring.resize(2)
    assert [line.text for line in ring.tail(10)] == ["3", "4"]
