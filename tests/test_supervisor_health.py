"""Liveness of READY instances: a stopped (SIGSTOP) or wedged server is killed and respawned."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

import pytest
import trio

from inference_node.supervisor import State, Supervisor
from inference_node.supervisor.metrics import SupervisorCollector
from inference_node.supervisor.state import HealthStreak
from shared.config.node import load_node_config
from shared.errors import ConfigError
from tests.support.ports import free_port
from tests.support.supervised import (
    STATE_TIMEOUT_S,
    instance,
    pid_of,
    process_alive,
    toy_command,
    wait_state,
)

INTERVAL_S: Final = 0.3
FAILURES: Final = 2
PROBE_TIMEOUT_S: Final = 0.5
FAST_LIVENESS: Final = {"liveness_interval_s": INTERVAL_S, "failures_before_restart": FAILURES,
                        "liveness_timeout_s": PROBE_TIMEOUT_S}
# Detection takes at most one interval to the first failing probe, then FAILURES probes that
# each last up to max(interval, timeout). The margin is for a loaded 2-core machine.
DETECT_BUDGET_S: Final = INTERVAL_S + FAILURES * max(INTERVAL_S, PROBE_TIMEOUT_S) + 3.0
Transition = tuple[str, State, State, str]


# ---- the pure streak ----

def test_streak_needs_failures_in_a_row() -> None:
    streak = HealthStreak(3, "/health", 5.0)
    assert streak.observe(HealthStreak.TIMED_OUT) is None
    assert streak.observe(HealthStreak.TIMED_OUT) is None
    assert streak.observe(None) is None  # a 200 ends the streak
    assert streak.failed_in_a_row == 0
    assert streak.observe(HealthStreak.TIMED_OUT) is None
    assert streak.observe(HealthStreak.TIMED_OUT) is None
    assert streak.observe(HealthStreak.TIMED_OUT) == \
        "health: no answer to /health for 3 probes of 5 s"


def test_streak_names_the_last_problem_when_the_server_did_answer() -> None:
    streak = HealthStreak(2, "/health", 5.0)
    assert streak.observe(HealthStreak.TIMED_OUT) is None
    assert streak.observe("HTTP 503") == "health: /health failed 2 probes in a row (last: HTTP 503)"


# ---- config ----

def write_node(tmp_path: Path, health: str) -> Path:
    path = tmp_path / "node-agent.toml"
    path.write_text(f'[instances.qwen]\ncommand = ["llama-server", "--port", "8080"]\n'
                    f"[instances.qwen.health]\n{health}\n")
    return path


def test_liveness_defaults(tmp_path: Path) -> None:
    health = load_node_config(write_node(tmp_path, "")).instances["qwen"].health
    assert (health.liveness_interval_s, health.failures_before_restart,
            health.liveness_timeout_s) == (10.0, 3, 5.0)
    assert (health.timeout_s, health.interval_s) == (300.0, 0.25)  # start-up: unchanged


@pytest.mark.parametrize(("line", "key", "problem"), [
    ("liveness_interval_s = 0", "liveness_interval_s", "found 0.0; expected seconds > 0"),
    ("liveness_interval_s = -1", "liveness_interval_s", "found -1.0; expected seconds > 0"),
    # nan and inf are refused by the loader for every number, with the key's bounds
    ("liveness_interval_s = nan", "liveness_interval_s", "found nan; allowed: a finite number of seconds <= 86400"),
    ("liveness_interval_s = inf", "liveness_interval_s", "found inf; allowed: a finite number of seconds <= 86400"),
    ("liveness_timeout_s = 0.0", "liveness_timeout_s", "found 0.0; expected seconds > 0"),
    ("liveness_timeout_s = -inf", "liveness_timeout_s", "found -inf; allowed: a finite number of seconds"),
    ("failures_before_restart = 0", "failures_before_restart", "found 0; allowed: between 1"),
    ("failures_before_restart = 1.5", "failures_before_restart", "found a number 1.5; expected an integer"),
    ("failures_before_restart = true", "failures_before_restart", "expected an integer"),
])
def test_liveness_keys_are_checked(tmp_path: Path, line: str, key: str, problem: str) -> None:
    path = write_node(tmp_path, line)
    with pytest.raises(ConfigError) as info:
        load_node_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: instances.qwen.health.{key}: "), message
    assert problem in message and "\n" not in message


# ---- a real child that stops answering ----

@pytest.fixture
async def sup(nursery: trio.Nursery) -> AsyncIterator[Supervisor]:
    supervisor = Supervisor()
    await nursery.start(supervisor.run)
    yield supervisor


async def stop_and_time_restart(sup: Supervisor, name: str) -> tuple[int, float, list[Transition]]:
    """SIGSTOP the READY child; return its pid, seconds until the supervisor acted, transitions."""
    seen: list[Transition] = []
    sup.add_state_listener(lambda n, old, new, why: seen.append((n, old, new, why)))
    old = pid_of(sup, name)
    os.kill(old, signal.SIGSTOP)
    stopped_at = trio.current_time()
    with trio.fail_after(DETECT_BUDGET_S):
        await sup.get(name).wait_for(frozenset({State.STOPPING}))
    detected = trio.current_time() - stopped_at
    await wait_state(sup, name, State.BACKOFF, State.STARTING)
    await wait_state(sup, name, State.READY)
    return old, detected, seen


async def test_a_stopped_server_is_killed_and_respawned(sup: Supervisor, tmp_path: Path) -> None:
    table: dict[str, Any] = {"command": toy_command(free_port()), "health": FAST_LIVENESS}
    await sup.apply({"toy": instance("toy", table, tmp_path / "x.toml")}, {})
    await wait_state(sup, "toy", State.READY)
    first = pid_of(sup, "toy")
    await trio.sleep(4 * INTERVAL_S)  # a healthy server is probed and left alone
    assert pid_of(sup, "toy") == first and sup.get("toy").state is State.READY
    assert any(line.text == "request /health" for line in sup.logs("toy", 50))

    old, detected, seen = await stop_and_time_restart(sup, "toy")
    assert detected <= DETECT_BUDGET_S
    assert pid_of(sup, "toy") != old and not process_alive(old)
    wedged = f"health: no answer to /health for {FAILURES} probes of {PROBE_TIMEOUT_S:g} s"
    moves = [(old_s, new_s, why) for n, old_s, new_s, why in seen]
    assert moves[0] == (State.READY, State.STOPPING, f"{wedged}; stopping pid {old}")
    assert moves[1][:2] == (State.STOPPING, State.BACKOFF)
    assert moves[1][2].startswith(f"{wedged}; restart 1 in ")
    assert sup.get("toy").restarts == 1
    assert sup.get("toy").last_error is not None and sup.get("toy").last_error.startswith(wedged)
    restarts = next(m for m in SupervisorCollector(sup).collect()
                    if m.name == "llamanap_instance_restarts")
    assert [s.value for s in restarts.samples if s.name.endswith("_total")] == [1.0]


async def test_an_unanswered_server_with_policy_never_fails(sup: Supervisor, tmp_path: Path) -> None:
    table: dict[str, Any] = {"command": toy_command(free_port()), "health": FAST_LIVENESS,
                             "restart": {"policy": "never"}}
    await sup.apply({"toy": instance("toy", table, tmp_path / "x.toml")}, {})
    await wait_state(sup, "toy", State.READY)
    old = pid_of(sup, "toy")
    os.kill(old, signal.SIGSTOP)
    with trio.fail_after(STATE_TIMEOUT_S):
        await sup.get("toy").wait_for(frozenset({State.FAILED}))
    assert sup.get("toy").reason.startswith("health: no answer to /health")
    assert not process_alive(old) and sup.get("toy").child is None


@pytest.mark.llama
async def test_a_sigstopped_llama_server_is_restarted_with_a_new_pid(
    sup: Supervisor, llama_server_bin: Path, tiny_model: Path, tmp_path: Path
) -> None:
    table = {"binary": str(llama_server_bin), "model": str(tiny_model), "port": free_port(),
             "args": ["-c", "256", "-np", "1", "-t", "1"], "health": FAST_LIVENESS,
             "stop_timeout_s": 5}
    await sup.apply({"qwen": instance("qwen", table, tmp_path / "x.toml")}, {})
    await wait_state(sup, "qwen", State.READY)
    first = pid_of(sup, "qwen")
    await trio.sleep(4 * INTERVAL_S)  # llama-server answers its probes: no restart
    assert pid_of(sup, "qwen") == first and sup.get("qwen").restarts == 0

    old, detected, seen = await stop_and_time_restart(sup, "qwen")
    assert detected <= DETECT_BUDGET_S
    new = pid_of(sup, "qwen")
    assert new != old and not process_alive(old)
    assert sup.get("qwen").restarts == 1
    assert [(o, n) for _, o, n, _ in seen[:3]] == [
        (State.READY, State.STOPPING), (State.STOPPING, State.BACKOFF), (State.BACKOFF, State.STARTING)]
    assert seen[0][3].startswith("health: no answer to /health for 2 probes of 0.5 s")
