"""`node-agent` as a person uses it: the agent as a real process, CLI commands against it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from tests.support.ports import free_port
from tests.support.supervised import STATE_TIMEOUT_S, process_alive, toy_command

REPO = Path(__file__).resolve().parent.parent
TOKEN = "cli-token-456"
POLL_S = 0.05
FAST = {"restart": {"backoff_initial_s": 0.05}, "health": {"interval_s": 0.05}, "stop_timeout_s": 5}


@dataclass
class RunningAgent:
    config: Path
    api_port: int
    process: subprocess.Popen[str]

    def cli(self, *args: str, config: bool = True) -> subprocess.CompletedProcess[str]:
        extra = ["--config", str(self.config)] if config else []
        return subprocess.run([sys.executable, "-m", "inference_node", *args, *extra],
                              capture_output=True, text=True, timeout=STATE_TIMEOUT_S, cwd=REPO)

    def rows(self) -> dict[str, dict[str, Any]]:
        out = self.cli("status", "--json")
        assert out.returncode == 0, out.stderr
        return {r["name"]: r for r in json.loads(out.stdout)["instances"]}

    def wait_state(self, name: str, state: str) -> dict[str, Any]:
        deadline = time.monotonic() + STATE_TIMEOUT_S
        while time.monotonic() < deadline:
            row = self.rows().get(name)
            if row and row["state"] == state:
                return row
            time.sleep(POLL_S)
        raise AssertionError(f"{name} never reached {state}: {self.rows()}")


def write_config(path: Path, port: int, instances: dict[str, Any]) -> None:
    token_file = path.parent / "token"
    token_file.write_text(TOKEN + "\n")
    agent = {"api_listen": f"127.0.0.1:{port}", "token_file": str(token_file),
             "state_file": str(path.parent / "state.toml")}
    path.write_text(tomli_w.dumps({"agent": agent, "instances": instances}))


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[RunningAgent]:
    config = tmp_path / "node-agent.toml"
    api_port = free_port()
    write_config(config, api_port, {"a": {"command": toy_command(free_port()), **FAST},
                                    "b": {"command": toy_command(free_port()), **FAST}})
    proc = subprocess.Popen([sys.executable, "-m", "inference_node", "run", "--config", str(config)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    running = RunningAgent(config, api_port, proc)
    try:
        deadline = time.monotonic() + STATE_TIMEOUT_S
        while running.cli("status").returncode != 0:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "the agent's API never answered"
            time.sleep(POLL_S)
        yield running
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=STATE_TIMEOUT_S)


def test_status_logs_and_actions(agent: RunningAgent) -> None:
    agent.wait_state("a", "ready")
    agent.wait_state("b", "ready")
    table = agent.cli("status")
    assert table.returncode == 0
    header, *lines = table.stdout.split("\n\n")[0].splitlines()  # then other tables (GPUs)
    assert header.split()[:4] == ["NAME", "STATE", "PID", "PORT"]
    assert [line.split()[:2] for line in lines] == [["a", "READY"], ["b", "READY"]]
    same = agent.cli("get", "instances").stdout.split("\n\n")[0].splitlines()
    assert [line.split()[:4] for line in same] == [line.split()[:4] for line in [header, *lines]]

    logs = agent.cli("logs", "a", "-n", "50")
    assert logs.returncode == 0 and "listening on 127.0.0.1" in logs.stdout

    stop = agent.cli("stop", "a", "--wait")
    assert stop.returncode == 0 and stop.stdout.startswith("a: stop: now STOPPED")
    start = agent.cli("start", "a", "--wait")
    assert start.returncode == 0 and "now READY" in start.stdout
    old = agent.rows()["b"]["pid"]
    assert agent.cli("restart", "b", "--wait").returncode == 0
    assert agent.rows()["b"]["pid"] not in (None, old)

    assert agent.cli("disable", "b", "--wait").returncode == 0
    assert agent.rows()["b"]["enabled"] is False
    assert agent.cli("enable", "b", "--wait").returncode == 0
    assert agent.rows()["b"]["state"] == "ready"


def test_enable_and_disable_print_the_state_they_led_to(agent: RunningAgent) -> None:
    """Without --wait they still report what the agent did, not the state before it acted."""
    old = agent.wait_state("b", "ready")["pid"]
    out = agent.cli("disable", "b")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("b: disable: now STOPPED (disable requested through the API; ")
    row = agent.rows()["b"]
    assert row["state"] == "stopped" and row["enabled"] is False and not process_alive(old)

    out = agent.cli("enable", "b")
    assert out.returncode == 0, out.stderr
    row = agent.rows()["b"]
    assert out.stdout == f"b: enable: now READY ({row['reason']})\n"
    assert row["state"] == "ready" and row["enabled"] is True and row["pid"] not in (None, old)


def test_reload_by_command_and_by_sighup(agent: RunningAgent) -> None:
    a_pid = agent.wait_state("a", "ready")["pid"]
    b_pid = agent.wait_state("b", "ready")["pid"]
    write_config(agent.config, agent.api_port, {"a": {"command": toy_command(agent.rows()["a"]["port"]), **FAST},
                                      "c": {"command": toy_command(free_port()), **FAST}})
    out = agent.cli("reload")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "reloaded; added: c; removed: b"
    assert agent.wait_state("a", "ready")["pid"] == a_pid
    assert not process_alive(b_pid)

    write_config(agent.config, agent.api_port, {"a": {"command": toy_command(agent.rows()["a"]["port"]), **FAST},
                                                 "d": {"command": toy_command(free_port()), **FAST}})
    agent.process.send_signal(signal.SIGHUP)
    agent.wait_state("d", "ready")
    assert "c" not in agent.rows()


def test_errors_are_one_line(agent: RunningAgent, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong-token"
    wrong.write_text("nope")
    url = f"http://127.0.0.1:{agent.api_port}"
    out = agent.cli("status", "--url", url, "--token-file", str(wrong), config=False)
    assert out.returncode == 1
    assert out.stderr == "node-agent: error: wrong bearer token\n"
    out = agent.cli("start", "nope")
    assert out.returncode == 1 and out.stderr == "node-agent: error: no instance named 'nope'; known: a, b\n"
    agent.config.write_text(agent.config.read_text() + "\n[instances.x]\nport = 0\n")
    out = agent.cli("reload")
    assert out.returncode == 1
    assert out.stderr.startswith("node-agent: reload refused: config error, nothing changed: ")
    assert out.stderr.count("\n") == 1


def test_sigterm_stops_instances_and_exits_cleanly(agent: RunningAgent) -> None:
    pids = [agent.wait_state(n, "ready")["pid"] for n in ("a", "b")]
    agent.process.send_signal(signal.SIGTERM)
    assert agent.process.wait(timeout=STATE_TIMEOUT_S) == 0
    assert not any(process_alive(pid) for pid in pids)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)


def test_unreachable_agent_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "node-agent.toml"
    write_config(config, free_port(), {})
    out = subprocess.run([sys.executable, "-m", "inference_node", "status", "--config", str(config)],
                         capture_output=True, text=True, timeout=STATE_TIMEOUT_S, cwd=REPO)
    assert out.returncode == 1
    assert out.stderr.startswith("node-agent: error: cannot reach node-agent at http://127.0.0.1:")
    assert out.stderr.count("\n") == 1


def test_systemd_notify_ready_reloading_stopping(tmp_path: Path) -> None:
    """The agent speaks sd_notify on $NOTIFY_SOCKET as a Type=notify unit needs."""
    config = tmp_path / "node-agent.toml"
    write_config(config, free_port(), {"a": {"command": toy_command(free_port()), **FAST}})
    sock_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.settimeout(STATE_TIMEOUT_S)
        env = {**os.environ, "NOTIFY_SOCKET": str(sock_path)}
        proc = subprocess.Popen([sys.executable, "-m", "inference_node", "run", "--config", str(config)],
                                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert sock.recv(4096).decode().startswith("READY=1")
            proc.send_signal(signal.SIGHUP)
            assert sock.recv(4096).decode().startswith("RELOADING=1")
            assert sock.recv(4096).decode().startswith("READY=1")
            proc.send_signal(signal.SIGTERM)
            assert sock.recv(4096).decode() == "STOPPING=1"
            assert proc.wait(timeout=STATE_TIMEOUT_S) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_unit_file_matches_what_the_agent_does() -> None:
    unit = (REPO / "deploy" / "systemd" / "node-agent.service").read_text().splitlines()
    assert "Type=notify" in unit
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit
    assert "Restart=on-failure" in unit
    assert "KillMode=mixed" in unit  # SIGTERM to the agent only: it stops its instances itself
    assert "StateDirectory=llamanap" in unit


def test_api_port_in_use_is_one_line_and_starts_nothing(tmp_path: Path) -> None:
    config = tmp_path / "node-agent.toml"
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        marker = tmp_path / "started"
        write_config(config, port, {"a": {"command": ["sh", "-c", f"touch {marker}; sleep 60"],
                                          "port": free_port()}})
        out = subprocess.run([sys.executable, "-m", "inference_node", "run", "--config", str(config)],
                             capture_output=True, text=True, timeout=STATE_TIMEOUT_S, cwd=REPO)
    assert out.returncode == 1
    assert out.stderr == (f"node-agent: error: {config}: agent.api_listen: port {port} on 127.0.0.1 "
                          "is already in use by another program; stop it or pick another port\n")
    assert not marker.exists()
