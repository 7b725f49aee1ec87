"""The dashboard's JSON from history rows and the proxy's status (pure): power timelines
with the live state, wakes as steps, GPU samples bucketed, the models each node serves."""

from __future__ import annotations

import pytest

from edge_proxy.dashboard.summary import (
    MAX_POINTS,
    HistoryRows,
    HistoryState,
    build_summary,
    downsample,
    live_segment,
    served_models,
    wake_steps,
)

NOW = 1_800_000_000.0


def status(state: str = "AWAKE", active: int = 0, in_state_s: float = 30.0) -> dict:
    return {"nodes": {"gpubox": {"state": state, "reason": "probe", "active": active,
                                 "held": 0, "time_in_state_s": in_state_s}},
            "routes": [{"listen": "a", "node": "gpubox"},
                       {"protocol": "http", "nodes": {"gpubox": {"models": ["qwen", "tiny"]}}},
                       {"protocol": "http", "nodes": {"gpubox": {"models": ["tiny"]}}}]}


def test_models_of_one_node_behind_several_ports_of_a_listener_are_the_nodes() -> None:
    routes = {"routes": [{"protocol": "http", "nodes": {
        "gpubox:8081": {"node": "gpubox", "models": ["chat"]},
        "gpubox:8082": {"node": "gpubox", "models": ["coder"]},
        "other": {"node": "other", "models": ["chat"]}}}]}
    assert served_models(routes) == {"gpubox": ["chat", "coder"], "other": ["chat"]}


def test_the_live_state_ends_the_timeline_and_busy_means_relaying() -> None:
    assert live_segment(status("AWAKE", active=2)["nodes"]["gpubox"], NOW, NOW - 3600) == \
        {"state": "busy", "start": NOW - 30, "end": NOW, "live": True}
    long_asleep = status("ASLEEP", in_state_s=10 * 3600)["nodes"]["gpubox"]
    assert live_segment(long_asleep, NOW, NOW - 3600)["start"] == NOW - 3600  # clipped
    rows = HistoryRows(power_intervals=[
        {"node": "gpubox", "state": "asleep", "start": NOW - 7200, "end": NOW - 600},
        {"node": "gpubox", "state": "awake", "start": NOW - 600, "end": NOW - 30},
        {"node": "other", "state": "busy", "start": NOW - 100, "end": NOW - 50}],
        nodes=["gpubox", "other"])
    out = build_summary(status(), HistoryState(True, rows=rows), now=NOW, window_s=3600)
    gpubox, other = out["nodes"]
    assert [(p["state"], p["start"], p["end"]) for p in gpubox["power"]] == [
        ("asleep", NOW - 3600, NOW - 600), ("awake", NOW - 600, NOW - 30),
        ("awake", NOW - 30, NOW)]
    assert gpubox["models"] == ["qwen", "tiny"] and gpubox["state"] == "AWAKE"
    # a node only the history knows: its rows, no live state
    assert other["configured"] is False and [p["state"] for p in other["power"]] == ["busy"]


def test_a_wake_is_its_steps_and_the_first_byte_of_the_request_that_woke_it() -> None:
    wake = {"node": "gpubox", "started": NOW, "outcome": "ready", "packets": 3,
            "host_up_ms": 900.0, "port_open_ms": 1500.0, "ready_ms": 2500.0, "total_ms": 2600.0}
    woke = [{"node": "gpubox", "t": NOW - 0.01, "ttfb_ms": 2800.0, "outcome": "woke"},
            {"node": "gpubox", "t": NOW + 1.0, "ttfb_ms": 2000.0, "outcome": "woke"},
            {"node": "elsewhere", "t": NOW, "ttfb_ms": 5.0, "outcome": "woke"}]
    steps = wake_steps(wake, woke)["steps"]
    assert steps["packet"] == 0 and steps["host_up"] == 900 and steps["ready"] == 2500
    assert steps["first_byte"] == pytest.approx(2790.0)  # the earliest first byte
    assert wake_steps(wake | {"ready_ms": None}, [])["steps"]["first_byte"] is None


def test_gpu_samples_are_bucketed_into_at_most_max_points() -> None:
    few = [{"t": NOW - i, "power_w": 50.0, "pstate_read": 8} for i in range(5, 0, -1)]
    assert [p["power_w"] for p in downsample(few, NOW - 3600, NOW)] == [50.0] * 5
    many = [{"t": NOW - 3600 + i / 2, "power_w": float(i % 2) * 100, "temperature_c": None}
            for i in range(7200)]
    points = downsample(many, NOW - 3600, NOW)
    assert len(points) == MAX_POINTS
    assert all(p["power_w"] == pytest.approx(50.0) for p in points)  # 15 s buckets of 0, 100, 0, ...
    assert all(p["temperature_c"] is None for p in points)


def test_history_off_or_unreadable_says_so() -> None:
    off = build_summary(status(), HistoryState(False), now=NOW, window_s=60)
    assert off["history"] == {"enabled": False, "problem": None}
    assert off["nodes"][0]["wakes"] == [] and off["nodes"][0]["energy_week"] is None
    broken = build_summary(status(), HistoryState(True, problem="cannot read x"), now=NOW,
                           window_s=60)
    assert broken["history"]["problem"] == "cannot read x"
