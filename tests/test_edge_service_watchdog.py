"""`edge-proxy run` and `node-agent run` under a unit with ``WatchdogSec=``: each pings
systemd's watchdog from its event loop (real processes, a real unix datagram socket standing
in for systemd)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.edge import TEST_TIMEOUT_S, free_port, write_config
from tests.test_node_cli import write_config as write_agent_config

REPO = Path(__file__).resolve().parent.parent
WATCHDOG_USEC = 200_000  # pings every 0.1 s
PINGS = 5


def run_proxy(tmp_path: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    path = write_config(tmp_path, free_port(), free_port())
    return subprocess.Popen([sys.executable, "-m", "edge_proxy", "run", "-c", str(path)],
                            cwd=REPO, env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def run_agent(tmp_path: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    path = tmp_path / "node-agent.toml"
    write_agent_config(path, free_port(), {})
    return subprocess.Popen([sys.executable, "-m", "inference_node", "run", "--config",
                             str(path)], cwd=REPO, env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=TEST_TIMEOUT_S)
    assert proc.returncode == 0, out
    return out


@pytest.mark.parametrize("run", [run_proxy, run_agent], ids=["edge-proxy", "node-agent"])
def test_the_service_pings_the_watchdog_while_it_runs(
        tmp_path: Path, run: Callable[[Path, dict[str, str]], subprocess.Popen[str]]) -> None:
    notify_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(TEST_TIMEOUT_S)
        proc = run(tmp_path, {"NOTIFY_SOCKET": str(notify_path),
                              "WATCHDOG_USEC": str(WATCHDOG_USEC)})
        try:
            seen: list[tuple[float, str]] = []
            while sum(1 for _, m in seen if m == "WATCHDOG=1") < PINGS:
                data = notify.recv(4096).decode()
                seen += [(time.monotonic(), line) for line in data.splitlines()]
            assert "READY=1" in [m for _, m in seen]
            pings = [t for t, m in seen if m == "WATCHDOG=1"]
            # pinged over and over, not once: at least the span of the pings in between
            assert pings[-1] - pings[0] >= (PINGS - 2) * WATCHDOG_USEC / 2e6 * 0.5
            stop(proc)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_no_pings_for_a_watchdog_meant_for_another_process(tmp_path: Path) -> None:
    notify_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(TEST_TIMEOUT_S)
        proc = run_proxy(tmp_path, {"NOTIFY_SOCKET": str(notify_path),
                                    "WATCHDOG_USEC": str(WATCHDOG_USEC), "WATCHDOG_PID": "1"})
        try:
            messages: list[str] = []
            while "READY=1" not in messages:
                messages += notify.recv(4096).decode().splitlines()
            time.sleep(WATCHDOG_USEC / 1e6 * 2)  # several ping intervals
            stop(proc)
            notify.setblocking(False)
            try:
                while data := notify.recv(4096):
                    messages += data.decode().splitlines()
            except BlockingIOError:
                pass
            assert "WATCHDOG=1" not in messages and "STOPPING=1" in messages
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_both_units_ask_for_the_watchdog_the_services_ping() -> None:
    for name in ("edge-proxy.service", "node-agent.service"):
        unit = (REPO / "deploy" / "systemd" / name).read_text().splitlines()
        assert "Type=notify" in unit and "Restart=on-failure" in unit
        (line,) = [line for line in unit if line.startswith("WatchdogSec=")]
        assert int(line.split("=")[1]) >= 10  # far above a ping interval on a loaded box
