"""One dashboard refresh over a real history database (rows written by the proxy's own
recorder): the whole window first, then only what was written since the cursor, including
a GPU sample that arrived late with an old time, and a wake a later request completes."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_proxy.dashboard.cursor import Cursor, CursorError
from edge_proxy.dashboard.history_db import DEFAULT_HOST, DatabaseHistory
from edge_proxy.dashboard.reading import read_rows
from edge_proxy.dashboard.summary import HistoryState, build_summary
from edge_proxy.history.energy import HostPower
from edge_proxy.history.records import (
    BusyInterval,
    ConnectionRecord,
    GpuSample,
    PowerInterval,
    Record,
    RequestRecord,
    WakeRecord,
)
from edge_proxy.history.store import HistoryRecorder, StoreLimits

NOW = 1_800_000_000.0
SINCE = NOW - 6 * 3600
ROOMY = StoreLimits(retention_days=36500, max_bytes=1 << 30)
GPU = "GPU-1"


def write(db: Path, *records: Record) -> None:
    recorder = HistoryRecorder(db, ROOMY)
    recorder.start()
    for r in records:
        getattr(recorder, {
            GpuSample: "record_gpu_sample", PowerInterval: "record_power_interval",
            BusyInterval: "record_busy_interval", ConnectionRecord: "record_connection",
            RequestRecord: "record_request", WakeRecord: "record_wake"}[type(r)])(r)
    recorder.close()


def request(t: float, outcome: str = "relayed", ttfb_ms: float = 80.0) -> RequestRecord:
    return RequestRecord(t, "127.0.0.1:0", "box", "tiny", "POST", "/v1/completions", 200,
                         outcome, ttfb_ms=ttfb_ms)  # type: ignore[arg-type]


def test_a_poll_with_the_cursor_reads_only_what_was_written_since(tmp_path: Path) -> None:
    db = tmp_path / "history.sqlite3"
    write(db, PowerInterval("box", "asleep", NOW - 7200, NOW - 3600),
          PowerInterval("box", "awake", NOW - 3600, NOW - 1800),
          WakeRecord("box", NOW - 3600, "ready", "request", packets=2, ready_ms=2000.0,
                     total_ms=2050.0),
          *[GpuSample(NOW - 3000 + i * 60, "box", GPU, power_w=50.0) for i in range(10)],
          BusyInterval("box", GPU, NOW - 2900, NOW - 2800),
          ConnectionRecord(NOW - 2000, "127.0.0.1:9000", "box", 10, 20, 500.0),
          request(NOW - 2500))
    source = DatabaseHistory(db, {}, DEFAULT_HOST)
    full, cursor = read_rows(source, SINCE, NOW, None, energy=True)
    assert (len(full.gpu_samples), len(full.power_intervals), len(full.wakes),
            len(full.busy_intervals), len(full.connections)) == (10, 2, 1, 1, 1)
    assert full.energy_week is not None and len(full.energy_week) == 1
    assert cursor.after("gpu_samples") == 10 and cursor.after("requests") == 1

    # Later: a sample taken long ago arrives now (the agent was away), and the request that
    # the old wake held finishes, with more of everything.
    write(db, GpuSample(NOW - 5000, "box", GPU, power_w=9.0),
          GpuSample(NOW - 10, "box", GPU, power_w=60.0),
          BusyInterval("box", GPU, NOW - 20, NOW - 15),
          PowerInterval("box", "awake", NOW - 1800, NOW - 1500),
          ConnectionRecord(NOW - 30, "127.0.0.1:9000", "box", 1, 2, 5.0, 1000.0, True),
          request(NOW - 3600.5, "woke", ttfb_ms=2500.0))
    new, after = read_rows(source, SINCE, NOW, Cursor.decode(cursor.encode()), energy=False)
    assert sorted(s["t"] for s in new.gpu_samples) == [NOW - 5000, NOW - 10]
    assert [(b["start"], b["end"]) for b in new.busy_intervals] == [(NOW - 20, NOW - 15)]
    assert [p["start"] for p in new.power_intervals] == [NOW - 1800]
    assert [c["t"] for c in new.connections] == [NOW - 30]
    assert new.energy_week is None  # not asked for: the page keeps the last one
    # the old wake goes again, now with the first byte of the request it held
    summary = build_summary({}, HistoryState(True, rows=new), now=NOW, window_s=NOW - SINCE,
                            cursor=after.encode(), incremental=True)
    (box,) = summary["nodes"]
    (wake,) = box["wakes"]
    assert wake["steps"]["first_byte"] == pytest.approx(-500 + 2500)
    assert summary["incremental"] and not summary["energy_included"]
    assert [g["busy"] for g in box["gpus"]] == [[{"start": NOW - 20, "end": NOW - 15}]]
    assert box["connections"][0]["woke"] is True
    # nothing written since: an empty answer
    none, same = read_rows(source, SINCE, NOW, after, energy=False)
    assert (none.gpu_samples, none.wakes, none.connections) == ([], [], [])
    assert same == after


def test_the_week_in_money_with_a_price(tmp_path: Path) -> None:
    db = tmp_path / "history.sqlite3"
    write(db, PowerInterval("box", "asleep", NOW - 7200, NOW - 3600),
          PowerInterval("box", "awake", NOW - 3600, NOW))
    host = HostPower(idle_w=50.0, sleep_w=5.0)
    priced = DatabaseHistory(db, {"box": host}, DEFAULT_HOST, price_per_kwh=0.4, currency="EUR")
    (week,) = priced.energy_week(NOW)
    # used: 50 W x 1 h + 5 W x 1 h; saved: (50 - 5) W x 1 h
    assert week["used_kwh"] == pytest.approx(0.055) and week["saved_kwh"] == pytest.approx(0.045)
    assert week["used_money"] == pytest.approx(0.022)
    assert week["saved_money"] == pytest.approx(0.018) and week["currency"] == "EUR"
    (plain,) = DatabaseHistory(db, {"box": host}, DEFAULT_HOST).energy_week(NOW)
    assert plain["used_money"] is None and plain["saved_money"] is None


@pytest.mark.parametrize("text", ["requests:x", "nope:3", "requests:1,,gpu", "a" * 200])
def test_a_cursor_the_page_could_not_have_sent_is_refused(text: str) -> None:
    with pytest.raises(CursorError, match="expected table:id"):
        Cursor.decode(text)


def test_a_cursor_round_trips() -> None:
    cursor = Cursor({"requests": 12, "gpu_samples": 400})
    assert cursor.encode() == "gpu_samples:400,requests:12"
    assert Cursor.decode(cursor.encode()) == cursor and Cursor.decode("") == Cursor()
