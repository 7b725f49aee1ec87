"""The idle policy against a real llama-server that takes its time to load: nothing suspends a
node while an instance is starting.

The suspend action is a recording fake (the hardware boundary); the agent, its supervisor, its
API, the TOML file and llama-server (behind a wrapper that sleeps before exec'ing it, like a
big model that takes seconds to load) are real.
"""

from __future__ import annotations

import functools
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import tomli_w
import trio

from inference_node.agent import Agent, Component, build_parts, run_agent
from inference_node.supervisor import State
from tests.support.ondemand import slow_binary
from tests.support.ports import free_port
from tests.support.supervised import wait_state

pytestmark = pytest.mark.llama

LOAD_DELAY_S = 3.0  # the wrapper's sleep before llama-server starts: a slow model load
IDLE_TIMEOUT_S = 1.0
WAIT_S = 120.0  # bounds a hang on a loaded machine; never a speed check


@dataclass
class RecordingSuspend:
    """Stands in for `systemctl suspend`: records when it was asked, and returns."""

    calls: list[float] = field(default_factory=list)
    asked: trio.Event = field(default_factory=trio.Event)

    async def suspend(self) -> None:
        self.calls.append(trio.current_time())
        self.asked.set()


def agent_config(folder: Path, api_port: int, **power: Any) -> Path:
    path = folder / "node-agent.toml"
    path.write_text(tomli_w.dumps({
        "agent": {"node": "box", "api_listen": f"127.0.0.1:{api_port}",
                  "state_file": str(folder / "state.toml")},
        "power": {"idle_timeout_s": 3600.0, "min_awake_s": 0.0, "check_interval_s": 0.1,
                  "resume_timeout_s": 600.0, "watch_foreign_gpu_processes": False, **power},
        "pstate": {"enabled": False},
        "instances": {},
    }))
    return path


async def test_a_reload_that_starts_a_slow_instance_does_not_suspend_until_it_is_ready_and_idle(
        nursery: trio.Nursery, tmp_path: Path, llama_server_bin: Path, tiny_model: Path) -> None:
    fake = RecordingSuspend()
    api_port = free_port()
    path = agent_config(tmp_path, api_port)

    def make(agent: Agent) -> list[Component]:  # the agent's own parts, suspending into a fake
        return build_parts(agent, suspend=fake, watch_system=False).components()

    agent: Agent = await nursery.start(functools.partial(run_agent, path, handle_signals=False,
                                                         make_components=make))
    moves: list[tuple[float, State]] = []
    agent.supervisor.add_state_listener(
        lambda name, old, new, reason: moves.append((trio.current_time(), new)))
    await trio.sleep(0.5)  # the node has been idle (no instances) for a while
    assert not fake.calls  # idle_timeout_s is an hour

    table = tomllib.loads(path.read_text())
    table["power"]["idle_timeout_s"] = IDLE_TIMEOUT_S  # long since idle by this measure
    table["instances"]["qwen"] = {
        "binary": str(slow_binary(tmp_path, llama_server_bin, LOAD_DELAY_S)), "model": str(tiny_model),
        "port": free_port(), "args": ["-c", "256", "-np", "1", "-t", "1"],
        "health": {"interval_s": 0.05}}
    path.write_text(tomli_w.dumps(table))
    await agent.reload("test reload")
    await wait_state(agent.supervisor, "qwen", State.STARTING)

    async with httpx.AsyncClient(timeout=WAIT_S) as client:
        await trio.sleep(IDLE_TIMEOUT_S + 0.5)  # past the idle timeout, still loading
        power = (await client.get(f"http://127.0.0.1:{api_port}/v1/power")).json()
        assert agent.supervisor.get("qwen").state is State.STARTING
        assert "instance qwen is starting (loading its model)" in power["keeping_awake"]
        assert power["state"] == "AWAKE" and not fake.calls

    with trio.fail_after(WAIT_S):
        await fake.asked.wait()
    ready_at = next(t for t, state in moves if state is State.READY)
    states = [state for _, state in moves]
    # started, loaded, and only then stopped for the suspend: never killed while loading
    assert states[:4] == [State.STARTING, State.READY, State.STOPPING, State.STOPPED]
    assert fake.calls[0] - ready_at >= IDLE_TIMEOUT_S  # idle for the whole timeout once READY
    assert len(fake.calls) == 1
