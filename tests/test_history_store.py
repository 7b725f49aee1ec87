"""The history store: rows round-trip, batches, retention and the size cap delete the oldest
rows, and a database that cannot be written is a logged error, never the caller's exception."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Final

import pytest
import trio

from edge_proxy.history import query
from edge_proxy.history.records import (
    ConnectionRecord,
    GpuSample,
    PowerInterval,
    RequestRecord,
    WakeRecord,
)
from edge_proxy.history.store import (
    HistoryRecorder,
    NullRecorder,
    StoreLimits,
    connect,
    open_recorder,
    used_bytes,
)
from shared.config.edge import HistoryConfig

WAIT_S: Final = 20.0
POLL_S: Final = 0.02
ROOMY = StoreLimits(retention_days=3650, max_bytes=1 << 30)
NOW: Final = 1_800_000_000.0


def request(t: float, **kw: object) -> RequestRecord:
    fields: dict[str, object] = dict(route="0.0.0.0:8000", node="gpubox", model="qwen",
                                     method="POST", path="/v1/chat/completions", status=200,
                                     outcome="relayed")
    fields.update(kw)
    return RequestRecord(t=t, **fields)  # type: ignore[arg-type]


def rows_of(path: Path) -> list[RequestRecord]:
    with query.open_readonly(path) as conn:
        return query.requests(conn)


def wait_until(predicate: object) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out waiting for the writer"
        time.sleep(POLL_S)


def test_every_kind_of_row_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite3"
    req = request(NOW, held_ms=4200.5, ttfb_ms=4300.0, total_ms=5100.0, prompt_tokens=22,
                  predicted_tokens=8, prompt_per_s=28909.3, predicted_per_s=65.6, outcome="woke")
    conn_rec = ConnectionRecord(NOW, "0.0.0.0:8080", "gpubox", 1234, 56789, 1500.0, 300.0, True)
    wake = WakeRecord("gpubox", NOW - 10, "ready", "POST /v1/chat/completions", 4, 2100.0,
                      5200.0, 7900.0, 8000.0)
    sample = GpuSample(NOW, "gpubox", "GPU-1234", 97.0, 10240.0, 71.0, 245.5, 16, 0)
    interval = PowerInterval("gpubox", "asleep", NOW - 3600, NOW - 10)
    recorder = HistoryRecorder(path, ROOMY, clock=lambda: NOW)
    recorder.start()
    recorder.record_request(req)
    recorder.record_connection(conn_rec)
    recorder.record_wake(wake)
    recorder.record_gpu_sample(sample)
    recorder.record_power_interval(interval)
    recorder.close()
    assert recorder.counts.written == 5
    with query.open_readonly(path) as conn:
        assert query.requests(conn) == [req]
        assert query.connections(conn) == [conn_rec]
        assert query.wakes(conn) == [wake]
        assert query.gpu_samples(conn) == [sample]
        assert query.power_intervals(conn, query.Filter(since=NOW - 60)) == [interval]
        assert query.power_intervals(conn, query.Filter(since=NOW - 5)) == []
        assert query.nodes(conn) == ["gpubox"]


def test_filters_pick_node_model_and_window(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite3"
    recorder = HistoryRecorder(path, ROOMY, clock=lambda: NOW)
    recorder.start()
    for i in range(10):
        recorder.record_request(request(NOW - i, node=f"n{i % 2}", model=f"m{i % 3}"))
    recorder.close()
    with query.open_readonly(path) as conn:
        got = query.requests(conn, query.Filter(since=NOW - 5.5, node="n0", model="m0"))
    assert [r.t for r in got] == [NOW]  # i = 0 only: i = 6 is n0/m0 but before the window
    assert [r.t for r in query.requests(connect(path), query.Filter(limit=3))] == \
        [NOW, NOW - 1, NOW - 2]


def test_full_batches_are_written_before_the_flush_interval(tmp_path: Path) -> None:
    recorder = HistoryRecorder(tmp_path / "h.sqlite3", ROOMY, batch_rows=50,
                               flush_interval_s=3600.0)
    recorder.start()
    for i in range(120):
        recorder.record_request(request(NOW + i))
    wait_until(lambda: recorder.counts.written >= 100)
    # two full batches went out; the last 20 rows wait for the interval (or the close)
    assert recorder.counts.written == 100
    recorder.close()
    assert recorder.counts.written == 120
    assert len(rows_of(tmp_path / "h.sqlite3")) == 120


def test_a_full_queue_drops_and_counts_without_blocking(tmp_path: Path) -> None:
    recorder = HistoryRecorder(tmp_path / "h.sqlite3", ROOMY, queue_rows=10)
    for i in range(15):  # the writer is not running yet: nothing drains the queue
        recorder.record_request(request(NOW + i))
    assert recorder.counts.dropped_full == 5
    recorder.start()
    recorder.close()
    assert recorder.counts.written == 10
    assert [r.t for r in rows_of(tmp_path / "h.sqlite3")][-1] == NOW


def test_retention_deletes_rows_older_than_retention_days(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite3"
    limits = StoreLimits(retention_days=1.0, max_bytes=1 << 30)
    recorder = HistoryRecorder(path, limits, clock=lambda: NOW)
    recorder.start()
    for age_days in (3.0, 1.5, 0.9, 0.1):
        recorder.record_request(request(NOW - age_days * 86400))
        recorder.record_power_interval(PowerInterval("gpubox", "asleep",
                                                     NOW - age_days * 86400 - 60,
                                                     NOW - age_days * 86400))
    recorder.close()
    assert sorted(NOW - r.t for r in rows_of(path)) == [0.1 * 86400, 0.9 * 86400]
    with query.open_readonly(path) as conn:
        assert len(query.power_intervals(conn)) == 2
    assert recorder.counts.pruned == 4


def test_size_cap_deletes_the_oldest_rows(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite3"
    cap = 256 * 1024
    recorder = HistoryRecorder(path, StoreLimits(retention_days=3650, max_bytes=cap),
                               clock=lambda: NOW)
    recorder.start()
    n = 5000  # about 1 MiB of rows
    for i in range(n):
        recorder.record_request(request(NOW - n + i, path=f"/v1/chat/completions?{i:08d}"))
    recorder.close()
    conn = connect(path)
    assert used_bytes(conn) <= cap
    kept = sorted(r.t for r in query.requests(conn))
    assert 0 < len(kept) < n
    # what is left is the newest run of rows, up to the last one written
    assert kept == [NOW - len(kept) + i for i in range(len(kept))]
    # pruned pages go back to the file system (auto_vacuum = INCREMENTAL)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert path.stat().st_size <= cap * 1.5


_CHILD: Final = """
import json, logging, sys
from pathlib import Path
from edge_proxy.history.records import RequestRecord
from edge_proxy.history.store import HistoryRecorder, StoreLimits
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
r = HistoryRecorder(Path(sys.argv[1]), StoreLimits(3650, 1 << 30), flush_interval_s=0.05)
r.start()
for i in range(int(sys.argv[2])):
    r.record_request(RequestRecord(1.0 + i, "r", "n", None, "GET", "/", 200, "relayed"))
r.close()
print(json.dumps(r.counts.__dict__))
"""


def _record_in_read_only(target: Path, path: Path, rows: int) -> tuple[dict[str, int], str]:
    """Record ``rows`` into ``path`` in a child process to which ``target`` (the file or its
    folder) is read-only: a read-only bind mount in a mount namespace of its own when run by
    root (root writes through any file mode), the file mode otherwise."""
    target.chmod(0o555 if target.is_dir() else 0o444)
    command = [sys.executable, "-c", _CHILD, str(path), str(rows)]
    if os.geteuid() == 0:
        remount = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" && exec "$@"'
        command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", remount,
                   str(target), *command]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=WAIT_S,
                          check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), done.stderr


def test_a_read_only_database_file_is_a_logged_error(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite3"
    recorder = HistoryRecorder(path, ROOMY)
    recorder.start()
    recorder.record_request(request(NOW))
    recorder.close()
    with connect(path) as conn:  # no WAL left beside it: the file alone holds the rows
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    counts, log = _record_in_read_only(path, path, 300)
    assert counts["written"] == 0 and counts["dropped_error"] == 300
    assert counts["write_errors"] >= 1
    # one line for the first failure; later ones within the interval are counted, not logged
    assert log.count("ERROR") == 1, log
    assert "history: cannot write" in log and str(path) in log and "readonly" in log
    assert len(rows_of(path)) == 1


def test_a_read_only_folder_is_a_logged_error(tmp_path: Path) -> None:
    folder = tmp_path / "state"
    folder.mkdir()
    counts, log = _record_in_read_only(folder, folder / "h.sqlite3", 10)
    assert counts["written"] == 0 and counts["dropped_error"] == 10
    assert "history: cannot write" in log and "unable to open database file" in log
    assert not (folder / "h.sqlite3").exists()


def test_a_writer_that_cannot_write_never_raises_into_the_trio_caller(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    # a folder where the database file should be: every open fails, also for root
    path = tmp_path / "h.sqlite3"
    path.mkdir()

    async def main() -> None:
        cfg = HistoryConfig(enabled=True, path=path)
        async with open_recorder(cfg) as recorder:
            assert isinstance(recorder, HistoryRecorder)
            for i in range(50):
                recorder.record_request(request(NOW + i))
                await trio.sleep(0)
        assert recorder.counts.dropped_error == 50

    with caplog.at_level(logging.ERROR, "edge_proxy.history.store"):
        trio.run(main)
    assert [r.levelname for r in caplog.records] == ["ERROR"]


async def test_history_off_gives_the_null_recorder(tmp_path: Path) -> None:
    async with open_recorder(HistoryConfig(enabled=False, path=tmp_path / "h")) as recorder:
        assert isinstance(recorder, NullRecorder)
        recorder.record_request(request(NOW))
    assert not (tmp_path / "h").exists()
