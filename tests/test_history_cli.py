"""``edge-proxy history`` and ``edge-proxy energy`` as real processes, on a database the test
wrote, with the proxy not running."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Final

import pytest

from edge_proxy.history.records import (
    BusyInterval,
    ConnectionRecord,
    GpuSample,
    PowerInterval,
    RequestRecord,
    WakeRecord,
)
from edge_proxy.history.store import HistoryRecorder, StoreLimits

ROOT: Final = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S: Final = 60.0
H: Final = 3600.0


def _config(tmp_path: Path, db: Path) -> Path:
    path = tmp_path / "edge.toml"
    path.write_text(f"""
[history]
enabled = true
path = "{db}"
price_per_kwh = 0.5
currency = "EUR"

[nodes.gpubox]
host = "127.0.0.1"
mac = "aa:bb:cc:dd:ee:ff"
host_idle_watts = 50.0
host_sleep_watts = 5.0

[[routes]]
listen = "127.0.0.1:0"
node = "gpubox"
backend_port = 8080
""")
    return path


def _edge_proxy(*args: str | Path, **kw: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "edge_proxy", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False,
                          **kw)  # type: ignore[call-overload, no-any-return]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "history.sqlite3"
    now = time.time()
    recorder = HistoryRecorder(path, StoreLimits(retention_days=3650, max_bytes=1 << 30))
    recorder.start()
    recorder.record_request(RequestRecord(
        now - 60, "127.0.0.1:8000", "gpubox", "qwen2.5-7b", "POST", "/v1/chat/completions", 200,
        "woke", held_ms=8123.0, ttfb_ms=8400.0, total_ms=9100.0, prompt_tokens=22,
        predicted_tokens=8, prompt_per_s=1234.5, predicted_per_s=65.6))
    recorder.record_request(RequestRecord(now - 30, "127.0.0.1:8000", "gpubox", None, "GET",
                                          "/v1/models", 200, "cache"))
    recorder.record_request(RequestRecord(now - 2 * 86400, "127.0.0.1:8000", "gpubox", "old",
                                          "POST", "/v1/completions", 200, "relayed"))
    recorder.record_connection(ConnectionRecord(now - 50, "127.0.0.1:8080", "gpubox", 2048,
                                                3 << 20, 61_000.0, 4100.0, True))
    recorder.record_wake(WakeRecord("gpubox", now - 70, "ready", "POST /v1/chat/completions", 5,
                                    2100.0, 6200.0, 8100.0, 8123.0))
    # the last 3 hours: asleep 2 h, then awake 1 h at 20 W on the GPU
    recorder.record_power_interval(PowerInterval("gpubox", "asleep", now - 3 * H, now - H))
    recorder.record_power_interval(PowerInterval("gpubox", "awake", now - H, now - 1))
    recorder.record_gpu_sample(GpuSample(now - H / 2, "gpubox", "GPU-a", power_w=20.0))
    recorder.close()
    return path


def test_history_prints_requests_and_wakes(tmp_path: Path, db: Path) -> None:
    done = _edge_proxy("history", "-c", _config(tmp_path, db))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:4] == ["TIME", "NODE", "MODEL", "REQUEST"]
    # newest first; the two-day-old request is outside the default 24 h
    assert "GET /v1/models" in lines[1] and "cache" in lines[1]
    woke = lines[2].split()
    assert woke[3:] == ["qwen2.5-7b", "POST", "/v1/chat/completions", "200", "woke", "8123ms",
                        "8400ms", "9100ms", "22", "8", "1234.5", "65.6"]
    assert "old" not in done.stdout
    conn = next(line for line in lines if "127.0.0.1:8080" in line).split()
    assert conn[2:] == ["gpubox", "127.0.0.1:8080", "2.0KiB", "3.0MiB", "4100ms", "61.0s", "yes"]
    wake = next(line for line in lines if "ready" in line).split()
    assert wake[2:9] == ["gpubox", "ready", "5", "2100ms", "6200ms", "8100ms", "8123ms"]


def test_history_filters_and_json(db: Path) -> None:
    done = _edge_proxy("history", "--db", db, "--model", "old", "--since", "3d", "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert [r["model"] for r in data["requests"]] == ["old"]
    assert [w["outcome"] for w in data["wakes"]] == ["ready"]
    assert data["connections"] == []  # --model: requests only
    done = _edge_proxy("history", "--db", db, "--node", "elsewhere")
    assert done.stdout.startswith("no requests in this window")


def test_energy_uses_the_nodes_watts_and_price(tmp_path: Path, db: Path) -> None:
    done = _edge_proxy("energy", "-c", _config(tmp_path, db), "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    used = sum(d["used_kwh"] for d in data["days"])
    saved = sum(d["saved_kwh"] for d in data["days"])
    # awake (50 + 20) W x 1 h, asleep 5 W x 2 h; saved (70 - 5) W x 2 h
    assert used == pytest.approx(0.07 + 0.01, rel=1e-3)
    assert saved == pytest.approx(0.13, rel=1e-3)
    assert data["price_per_kwh"] == 0.5
    table = _edge_proxy("energy", "-c", _config(tmp_path, db))
    assert "USED EUR" in table.stdout and "SAVED kWh" in table.stdout
    assert "gpubox" in table.stdout


def test_energy_splits_awake_time_into_idle_and_busy(tmp_path: Path) -> None:
    db = tmp_path / "busy.sqlite3"
    now = time.time()
    recorder = HistoryRecorder(db, StoreLimits(retention_days=3650, max_bytes=1 << 30))
    recorder.start()
    recorder.record_power_interval(PowerInterval("gpubox", "asleep", now - 3 * H, now - H))
    recorder.record_power_interval(PowerInterval("gpubox", "awake", now - H, now - 1))
    # a quarter of the awake hour one GPU had a task, at 200 W; idle it drew 20 W
    recorder.record_busy_interval(BusyInterval("gpubox", "GPU-a", now - H / 2, now - H / 4))
    recorder.record_gpu_sample(GpuSample(now - 0.4 * H, "gpubox", "GPU-a", power_w=200.0))
    recorder.record_gpu_sample(GpuSample(now - 0.1 * H, "gpubox", "GPU-a", power_w=20.0))
    recorder.close()
    done = _edge_proxy("energy", "-c", _config(tmp_path, db), "--json")
    assert done.returncode == 0, done.stderr
    days = json.loads(done.stdout)["days"]
    assert sum(d["busy_s"] for d in days) == pytest.approx(H / 4)
    assert sum(d["awake_s"] for d in days) == pytest.approx(3 * H / 4 - 1)
    assert sum(d["asleep_s"] for d in days) == pytest.approx(2 * H)
    # idle (50 + 20) W x 0.75 h, busy (50 + 200) W x 0.25 h, asleep 5 W x 2 h
    used = sum(d["used_kwh"] for d in days)
    assert used == pytest.approx((52.5 + 62.5 + 10) / 1000, rel=1e-3)
    saved = sum(d["saved_kwh"] for d in days)
    assert saved == pytest.approx((70 - 5) * 2 / 1000, rel=1e-3)  # busy draw left out
    table = _edge_proxy("energy", "-c", _config(tmp_path, db)).stdout.splitlines()
    assert table[0].split()[:6] == ["NODE", "PERIOD", "ASLEEP", "AWAKE", "IDLE", "BUSY"]
    weeks = json.loads(done.stdout)["weeks"]
    assert sum(w["busy_s"] for w in weeks) == pytest.approx(H / 4)


def test_energy_without_a_config_says_it_used_default_watts(db: Path) -> None:
    done = _edge_proxy("energy", "--db", db)
    assert done.returncode == 0, done.stderr
    assert "host watts: defaults (40 W idle, 2 W asleep)" in done.stdout


def test_a_missing_database_is_one_line(tmp_path: Path) -> None:
    done = _edge_proxy("history", "--db", tmp_path / "nope.sqlite3")
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0
    assert "no history database at" in done.stderr and "--db PATH" in done.stderr


def test_a_bad_since_is_a_usage_error(db: Path) -> None:
    done = _edge_proxy("history", "--db", db, "--since", "yesterday")
    assert done.returncode == 2 and "expected a number and a unit" in done.stderr


def test_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    path = tmp_path / "big.sqlite3"
    now = time.time()
    recorder = HistoryRecorder(path, StoreLimits(retention_days=3650, max_bytes=1 << 30))
    recorder.start()
    for i in range(5000):  # far more than a pipe buffer holds
        recorder.record_request(RequestRecord(now - i, "r", "gpubox", "m", "GET", f"/{i}", 200,
                                              "relayed"))
    recorder.close()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with subprocess.Popen([sys.executable, "-m", "edge_proxy", "history", "--db", str(path),
                           "--limit", "5000"], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as child:
        assert child.stdout is not None and child.stderr is not None
        # the reader goes away before the table is written (as `| head` does once it has its
        # lines; closing before the first write is the case that does not depend on timing)
        child.stdout.close()
        err = child.stderr.read()
        assert child.wait(RUN_TIMEOUT_S) == 0
    assert err == b""
