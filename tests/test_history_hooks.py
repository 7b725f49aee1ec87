"""RequestLog and PowerStates: what the request path hands the recorder."""

from __future__ import annotations

import json
from pathlib import Path

from edge_proxy.history import query
from edge_proxy.history.hooks import NodeHistory, PowerStates, RequestLog
from edge_proxy.history.records import PowerInterval, RequestRecord, WakeRecord
from edge_proxy.history.store import HistoryRecorder, StoreLimits

WALL = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _log(recorder: HistoryRecorder, clock: Clock) -> RequestLog:
    return RequestLog(recorder, "0.0.0.0:8000", "POST", "/v1/chat/completions", clock=clock,
                      wall=lambda: WALL)


def _rows(tmp_path: Path, steps: list[object]) -> list[RequestRecord]:
    recorder = HistoryRecorder(tmp_path / "h.sqlite3", StoreLimits(3650, 1 << 30),
                               clock=lambda: WALL)
    recorder.start()
    for step in steps:
        step(recorder)  # type: ignore[operator]
    recorder.close()
    with query.open_readonly(tmp_path / "h.sqlite3") as conn:
        return query.requests(conn)


def test_a_held_streamed_request_becomes_one_woke_row(tmp_path: Path) -> None:
    clock = Clock()
    final = {"choices": [], "usage": {"prompt_tokens": 22, "completion_tokens": 8},
             "timings": {"prompt_n": 22, "predicted_n": 8, "prompt_per_second": 900.5,
                         "predicted_per_second": 61.0}}

    def run(recorder: HistoryRecorder) -> None:
        log = _log(recorder, clock)
        log.routed("gpubox", "qwen")
        log.hold_started()
        clock.now += 5.0  # the SSE comment while held is the first byte
        log.response_started(200, "text/event-stream")
        clock.now += 3.0
        log.hold_ended()
        log.body(b'data: {"choices": [{"delta": {"content": "Good"}}]}\n\n')
        log.body(f"data: {json.dumps(final)}\n\ndata: [DONE]\n\n".encode())
        clock.now += 0.5
        log.finish()
        log.finish()  # once only

    (row,) = _rows(tmp_path, [run])
    assert row == RequestRecord(WALL, "0.0.0.0:8000", "gpubox", "qwen", "POST",
                                "/v1/chat/completions", 200, "woke", held_ms=8000.0,
                                ttfb_ms=5000.0, total_ms=8500.0, prompt_tokens=22,
                                predicted_tokens=8, prompt_per_s=900.5, predicted_per_s=61.0)


def test_outcomes_set_or_inferred(tmp_path: Path) -> None:
    clock = Clock()

    def cached(recorder: HistoryRecorder) -> None:
        log = _log(recorder, clock)
        log.outcome = "cache"
        log.response_started(200, "application/json")
        log.finish()

    def left(recorder: HistoryRecorder) -> None:
        log = _log(recorder, clock)
        log.finish(client_left=True)

    rows = _rows(tmp_path, [cached, left])
    assert sorted(r.outcome for r in rows) == ["cache", "client_left"]
    assert {r.status for r in rows} == {200, None}


def test_a_hold_for_a_load_alone_is_loaded_and_one_that_began_with_a_wake_is_woke(
        tmp_path: Path) -> None:
    clock = Clock()

    def held(*waking: bool) -> object:
        def run(recorder: HistoryRecorder) -> None:
            log = _log(recorder, clock)
            log.path = "/".join(map(str, waking))  # tells the rows apart
            for w in waking:  # a hold per attempt (a load again after a TTL unload, say)
                log.hold_started(waking=w)
                clock.now += 1.0
                log.hold_ended()
            log.response_started(200, "application/json")
            log.finish()
        return run

    rows = {r.path: r.outcome for r in _rows(tmp_path, [
        held(False), held(True), held(False, True), held(True, False), held()])}
    assert rows == {"False": "loaded", "True": "woke", "False/True": "woke",
                    "True/False": "woke", "": "relayed"}


def test_power_states_close_intervals_on_change_and_cut_long_ones() -> None:
    states = PowerStates(max_interval_s=300)
    assert states.observe("n", None, 0) == []
    assert states.observe("n", "awake", 10) == []
    assert states.observe("n", "awake", 20) == []
    assert states.observe("n", "asleep", 50) == [PowerInterval("n", "awake", 10, 50)]
    assert states.observe("n", "asleep", 349) == []
    assert states.observe("n", "asleep", 350) == [PowerInterval("n", "asleep", 50, 350)]
    assert states.observe("n", None, 400) == [PowerInterval("n", "asleep", 350, 400)]
    assert states.observe("n", "busy", 410) == []
    assert states.observe("m", "awake", 410) == []
    assert states.close(420) == [PowerInterval("n", "busy", 410, 420),
                                 PowerInterval("m", "awake", 410, 420)]
    assert states.close(430) == []


def test_node_history_records_wakes_with_their_packets_and_cause(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite3"
    recorder = HistoryRecorder(path, StoreLimits(3650, 1 << 30), clock=lambda: WALL)
    recorder.start()
    node = NodeHistory(recorder, "n")
    node.observe("UNKNOWN", 0, "started", WALL)
    node.observe("ASLEEP", 0, "probe timed out", WALL + 1)
    node.probe("probe_timeout", "connect timed out", WALL + 5)  # not waking yet: ignored
    node.observe("WAKING", 1, "held connection", WALL + 10)  # its first packet counted
    node.probe("probe_timeout", "connect timed out", WALL + 11)  # still asleep
    node.observe("WAKING", 2, "tick", WALL + 11)
    node.probe("probe_refused", "connect refused", WALL + 12.5)  # the host answers
    node.observe("WAKING", 3, "tick", WALL + 14)
    node.probe("probe_refused", "GET /health answered 503", WALL + 15)  # the port is open
    node.probe("probe_ok", "", WALL + 16)
    node.wake_finished("ready", 6.0, 4, WALL + 16)
    node.observe("AWAKE", 4, "probe ok", WALL + 16)
    node.close(WALL + 20)
    recorder.close()
    with query.open_readonly(path) as conn:
        (wake,) = query.wakes(conn)
        intervals = query.power_intervals(conn)
    assert wake == WakeRecord("n", WALL + 10, "ready", "held connection", packets=4,
                              host_up_ms=2500.0, port_open_ms=5000.0, ready_ms=6000.0,
                              total_ms=6000.0)
    # WAKING draws awake power; UNKNOWN is no interval
    assert intervals == [PowerInterval("n", "asleep", WALL + 1, WALL + 10),
                         PowerInterval("n", "awake", WALL + 10, WALL + 20)]
