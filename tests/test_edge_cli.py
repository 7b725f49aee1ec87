"""`edge-proxy run`, `status` and `wake` as a user (and systemd) runs them: real processes."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from edge_proxy.cli import format_status
from tests.support.edge import TEST_TIMEOUT_S, expected_packet, free_port, write_config

REPO = Path(__file__).resolve().parent.parent
POLL_S = 0.05


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_proxy", *args], capture_output=True,
                          text=True, timeout=TEST_TIMEOUT_S, cwd=REPO)


@contextmanager
def udp_listener() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(TEST_TIMEOUT_S)
        yield sock


def config(tmp_path: Path, wol_port: int, control_port: int, route_port: int) -> Path:
    path = write_config(tmp_path, free_port(), wol_port)
    text = path.read_text().replace('listen = "127.0.0.1:0"\ntoken',
                                    f'listen = "127.0.0.1:{control_port}"\ntoken')
    path.write_text(text.replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{route_port}"'))
    return path


def notifications(sock: socket.socket, until: str) -> list[str]:
    seen: list[str] = []
    while until not in seen:
        seen += sock.recv(4096).decode().splitlines()
    return seen


def connectable(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def test_run_notifies_systemd_reloads_on_sighup_and_stops_on_sigterm(tmp_path: Path) -> None:
    control, route_a, route_b = free_port(), free_port(), free_port()
    path = config(tmp_path, 9, control, route_a)
    notify_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(TEST_TIMEOUT_S)
        proc = subprocess.Popen([sys.executable, "-m", "edge_proxy", "run", "-c", str(path)],
                                cwd=REPO, env={**os.environ, "NOTIFY_SOCKET": str(notify_path)},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            assert "READY=1" in notifications(notify, "READY=1")
            assert connectable(route_a)
            status = cli("status", "-c", str(path))
            assert status.returncode == 0, status.stderr
            header, row = status.stdout.splitlines()[:2]
            assert header.split()[:3] == ["NODE", "STATE", "FOR"]
            assert row.split()[0] == "box" and row.split()[1] in {"ASLEEP", "UNKNOWN", "WAKING"}  # our connect wakes it
            path.write_text(path.read_text().replace(f"127.0.0.1:{route_a}", f"127.0.0.1:{route_b}"))
            proc.send_signal(signal.SIGHUP)
            assert "RELOADING=1" in notifications(notify, "RELOADING=1")
            notifications(notify, "READY=1")
            assert connectable(route_b) and not connectable(route_a)
            proc.send_signal(signal.SIGTERM)
            assert "STOPPING=1" in notifications(notify, "STOPPING=1")
            out, _ = proc.communicate(timeout=TEST_TIMEOUT_S)
            assert proc.returncode == 0, out
            assert "config reloaded" in out
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            if hard != resource.RLIM_INFINITY:  # raised to what the system allows
                assert f"open-file limit: {hard}" in out
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_wake_sends_directly_when_no_proxy_runs(tmp_path: Path) -> None:
    with udp_listener() as udp:
        path = config(tmp_path, udp.getsockname()[1], free_port(), free_port())
        out = cli("wake", "box", "-c", str(path))
        assert out.returncode == 0, out.stderr
        assert "sending the packet directly" in out.stdout
        assert udp.recv(2048) == expected_packet()
        out = cli("wake", "nosuchbox", "-c", str(path))
        assert out.returncode == 1
        assert out.stderr.strip() == "edge-proxy: error: unknown node 'nosuchbox'; known nodes: box"


def test_wake_goes_through_the_running_proxy(tmp_path: Path) -> None:
    control = free_port()
    with udp_listener() as udp:
        path = config(tmp_path, udp.getsockname()[1], control, free_port())
        proc = subprocess.Popen([sys.executable, "-m", "edge_proxy", "run", "-c", str(path)],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + TEST_TIMEOUT_S
            while not connectable(control):
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(POLL_S)
            out = cli("wake", "box", "-c", str(path))
            assert out.returncode == 0, out.stderr
            assert "by the running proxy" in out.stdout
            assert udp.recv(2048) == expected_packet()
        finally:
            proc.terminate()
            proc.wait(timeout=TEST_TIMEOUT_S)


@pytest.mark.parametrize("what", ["route", "control"])
def test_run_with_a_port_in_use_is_one_line(tmp_path: Path, what: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path = (config(tmp_path, 9, free_port(), port) if what == "route"
                else config(tmp_path, 9, port, free_port()))
        out = cli("run", "-c", str(path))
    assert out.returncode == 1
    # log lines come first (the config asks for debug logs); the error itself is one line
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("edge-proxy:")]
    assert len(lines) == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().endswith(lines[0])
    assert lines[0].startswith("edge-proxy: error: ")
    assert f"127.0.0.1:{port}: cannot listen: Address already in use" in lines[0]


def test_status_without_a_running_proxy_says_so(tmp_path: Path) -> None:
    path = config(tmp_path, 9, free_port(), free_port())
    out = cli("status", "-c", str(path))
    assert out.returncode == 1
    assert "cannot reach the proxy" in out.stderr and "edge-proxy run" in out.stderr


def test_status_table_shows_tcp_and_http_routes() -> None:
    status = {
        "nodes": {"box": {"state": "WAKING", "time_in_state_s": 3.2, "held": 4, "active": 1,
                          "reason": "connection held while asleep",
                          "last_wake": {"started_s_ago": 3.2, "duration_s": None, "outcome": None}}},
        "routes": [{"listen": "0.0.0.0:8080", "node": "box", "backend_port": 8080,
                    "ready": "http:/health"},
                   {"listen": "0.0.0.0:8000", "protocol": "http", "urls": [],
                    "nodes": {"box": {"backend_port": 8081, "models": []}}}],
    }
    lines = format_status(status).splitlines()
    assert lines[0].split() == ["NODE", "STATE", "FOR", "HELD", "ACTIVE", "LAST", "WAKE", "REASON"]
    assert lines[1].split()[:6] == ["box", "WAKING", "3s", "4", "1", "running"]
    assert lines[1].endswith("connection held while asleep")
    assert "route 0.0.0.0:8080 -> box:8080 (ready: http:/health)" in lines
    assert "route 0.0.0.0:8000 -> box:8081 (http)" in lines


def test_status_table_names_each_port_of_a_node_behind_one_http_route() -> None:
    status = {"nodes": {}, "routes": [{
        "listen": "0.0.0.0:8000", "protocol": "http", "urls": [], "requests_in_flight": 1,
        "nodes": {"box:8081": {"node": "box", "backend_port": 8081, "in_flight": 1},
                  "box:8082": {"node": "box", "backend_port": 8082, "in_flight": 0}}}]}
    assert "route 0.0.0.0:8000 -> box:8081, box:8082 (http, 1 request(s) in flight: " \
        "box:8081 1)" in format_status(status).splitlines()


def test_status_table_says_when_a_failed_wake_may_be_retried() -> None:
    status = {"nodes": {"box": {
        "state": "ASLEEP", "time_in_state_s": 12.0, "held": 0, "active": 0,
        "reason": "wake timed out after 60 s", "wake_cooldown_left_s": 17.2,
        "last_wake": {"started_s_ago": 72.0, "duration_s": 60.0, "outcome": "timeout"}}},
        "routes": []}
    row = format_status(status).splitlines()[1]
    assert row.split()[:7] == ["box", "ASLEEP", "12s", "0", "0", "timeout", "in"]
    assert row.endswith("wake timed out after 60 s; no new wake for 18 s")
