"""A killed agent's llama-servers are found and stopped by the next agent before it starts its own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import httpx
import psutil
import pytest
import tomli_w
import trio

from inference_node.supervisor.orphans import (
    OWNER_PID_VAR,
    OWNER_STATE_VAR,
    OWNER_VAR,
    ChildMarker,
    find_orphans,
    stop_orphan,
)
from tests.support.ports import free_port
from tests.support.supervised import STATE_TIMEOUT_S, process_alive

REPO: Final = Path(__file__).resolve().parent.parent
NODE: Final = "orphan-test"
POLL_S: Final = 0.1
LLAMA_ARGS: Final = ["-c", "256", "-np", "1", "-t", "1"]


def marked(state_file: Path, instance: str) -> list[psutil.Process]:
    """Live processes whose environment names this node's ``instance`` under ``state_file``."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            env = proc.environ()
        except psutil.Error:
            continue
        if env.get(OWNER_VAR) == f"{NODE}/{instance}" and env.get(OWNER_STATE_VAR) == str(state_file):
            found.append(proc)
    return found


class Agent:
    """``python -m inference_node run`` as a real process, and its API."""

    def __init__(self, config: Path, api_port: int, log: Path) -> None:
        self.config, self.url, self.log = config, f"http://127.0.0.1:{api_port}", log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "inference_node", "run", "--config", str(self.config)],
                cwd=REPO, stdout=out, stderr=subprocess.STDOUT)

    def row(self, name: str) -> dict[str, Any] | None:
        try:
            rows = httpx.get(f"{self.url}/v1/status", timeout=5.0).json()["instances"]
        except httpx.HTTPError:
            return None
        return next((r for r in rows if r["name"] == name), None)

    def wait_ready(self, name: str) -> dict[str, Any]:
        deadline = time.monotonic() + 2 * STATE_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
            row = self.row(name)
            if row and row["state"] == "ready":
                return row
            assert not row or row["state"] != "failed", row
            time.sleep(POLL_S)
        raise AssertionError(f"{name} never READY: {self.row(name)}\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=STATE_TIMEOUT_S)


@pytest.fixture
def agent(tmp_path: Path, llama_server_bin: Path, tiny_model: Path) -> Iterator[Agent]:
    state_file = tmp_path / "state.toml"
    api_port = free_port()
    config = tmp_path / "node-agent.toml"
    instance = {"binary": str(llama_server_bin), "model": str(tiny_model), "port": free_port(),
                "args": LLAMA_ARGS, "stop_timeout_s": 5}
    config.write_text(tomli_w.dumps({
        "agent": {"node": NODE, "api_listen": f"127.0.0.1:{api_port}", "state_file": str(state_file)},
        "power": {"enabled": False}, "pstate": {"enabled": False},
        "instances": {"qwen": instance}}))
    running = Agent(config, api_port, tmp_path / "agent.log")
    try:
        yield running
    finally:
        running.stop()
        for proc in marked(state_file, "qwen"):  # a failed test must not leave orphans behind
            proc.kill()


@pytest.mark.llama
def test_a_restarted_agent_stops_the_orphans_of_the_killed_one(agent: Agent, tmp_path: Path) -> None:
    state_file = tmp_path / "state.toml"
    agent.start()
    orphan = agent.wait_ready("qwen")["pid"]
    assert agent.proc is not None
    first_agent = agent.proc.pid
    env = psutil.Process(orphan).environ()
    assert (env[OWNER_VAR], env[OWNER_STATE_VAR], env[OWNER_PID_VAR]) == (
        f"{NODE}/qwen", str(state_file), str(first_agent))

    agent.proc.send_signal(signal.SIGKILL)
    agent.proc.wait(timeout=STATE_TIMEOUT_S)
    time.sleep(0.5)
    assert process_alive(orphan), "the llama-server should outlive a SIGKILLed agent"
    assert psutil.Process(orphan).ppid() != first_agent

    agent.start()
    row = agent.wait_ready("qwen")
    assert row["pid"] != orphan and row["restarts"] == 0
    assert not process_alive(orphan)
    assert [p.pid for p in marked(state_file, "qwen")] == [row["pid"]]
    assert psutil.Process(row["pid"]).name() == "llama-server"
    log = agent.log.read_text()
    assert f"found llama-server pid {orphan} of instance qwen from an earlier agent; stopping it" in log
    assert f"stopped llama-server pid {orphan} of instance qwen (SIGTERM)" in log
    assert "already in use" not in log


def sleeper(env: dict[str, str]) -> subprocess.Popen[bytes]:
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    return subprocess.Popen([sys.executable, "-c", code], env={**os.environ, **env},
                            start_new_session=True)


async def test_only_this_agents_orphans_are_found_and_a_deaf_one_is_killed(tmp_path: Path) -> None:
    """Children of a live agent, of another node or another state file are left alone; one
    that ignores SIGTERM gets SIGKILL after the grace time."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid no agent runs under any more
    ours = ChildMarker(NODE, str(tmp_path / "state.toml"), os.getpid())
    dead_agent = ChildMarker(NODE, ours.agent_id, gone.pid)
    procs = {
        "orphan": sleeper(dead_agent.env("qwen")),
        "live agent's": sleeper(ChildMarker(NODE, ours.agent_id, os.getppid()).env("qwen")),
        "other node": sleeper(ChildMarker("elsewhere", ours.agent_id, gone.pid).env("qwen")),
        "other state file": sleeper(ChildMarker(NODE, str(tmp_path / "x.toml"), gone.pid).env("qwen")),
        "own": sleeper(ours.env("qwen")),
        "unmarked": sleeper({}),
    }
    try:
        await trio.sleep(0.3)  # let each exec and set its SIGTERM handler
        found = await trio.to_thread.run_sync(find_orphans, ours)
        assert [(o.pid, o.instance) for o in found] == [(procs["orphan"].pid, "qwen")]
        assert await stop_orphan(found[0], grace_s=0.2)
        assert procs["orphan"].wait(timeout=STATE_TIMEOUT_S) == -signal.SIGKILL
        assert all(p.poll() is None for name, p in procs.items() if name != "orphan")
    finally:
        for p in procs.values():
            p.kill()
            p.wait()
