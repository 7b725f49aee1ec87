"""The dashboard's JSON, built from history rows and the proxy's status. Pure: rows, status
and ``now`` in, one JSON-ready dict out.

Per node: what it is doing now and serves (from the proxy's own status), its power states
over the window (history's closed intervals plus the state it is in now), its wakes as steps
in ms after the first magic packet, its GPUs' samples (averaged into at most
``MAX_POINTS`` buckets, so a week of samples stays a small answer) and busy spans, its TCP
connections, and the energy of this week. An incremental answer (``incremental``) holds
only the rows written since the cursor the page sent (and the wakes a new request
completes); the page adds them to what it has.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from edge_proxy.dashboard.source import Row

# Points per GPU series: about one per pixel column of a chart on a laptop screen.
MAX_POINTS: Final = 240
GPU_FIELDS: Final = ("utilization_pct", "memory_used_mib", "temperature_c", "power_w")
# A request that woke a node arrived at most this long before the wake row says it started
# (the wake starts on the request; the two clocks are read a moment apart).
WAKE_MATCH_S: Final = 2.0
# The proxy's wake-machine states as the power timeline draws them.
LIVE_STATES: Final = {"ASLEEP": "asleep", "AWAKE": "awake", "WAKING": "waking",
                      "DRAINING": "draining", "UNKNOWN": "unknown"}


@dataclass(frozen=True)
class HistoryRows:
    """What one refresh read from history for the window."""

    wakes: Sequence[Row] = ()
    gpu_samples: Sequence[Row] = ()
    power_intervals: Sequence[Row] = ()
    busy_intervals: Sequence[Row] = ()
    connections: Sequence[Row] = ()
    woke_requests: Sequence[Row] = ()
    energy_week: Sequence[Row] | None = ()  # None: not read this time (the page keeps its own)
    nodes: Sequence[str] = ()


@dataclass(frozen=True)
class HistoryState:
    """Whether history is on, and why it could not be read (one line), if so."""

    enabled: bool
    problem: str | None = None
    rows: HistoryRows = field(default_factory=HistoryRows)


def served_models(status: Mapping[str, Any]) -> dict[str, list[str]]:
    """Node -> the models its HTTP routes serve, from ``Proxy.status()``."""
    models: dict[str, list[str]] = defaultdict(list)
    for route in status.get("routes", []):
        for key, entry in route.get("nodes", {}).items():
            name = entry.get("node", key)  # keys are NODE:PORT for a node with several ports
            models[name] += [m for m in entry.get("models", []) if m not in models[name]]
    return dict(models)


def live_segment(node: Mapping[str, Any], now: float, since: float) -> dict[str, Any]:
    """The state the node is in now, from when it entered it (clipped to the window)."""
    state = LIVE_STATES.get(node["state"], "unknown")
    if state == "awake" and node.get("active", 0) > 0:
        state = "busy"
    start = max(since, now - float(node.get("time_in_state_s", 0.0)))
    return {"state": state, "start": start, "end": now, "live": True}


def power_timeline(intervals: Sequence[Row], since: float, now: float) -> list[dict[str, Any]]:
    """Closed intervals clipped to ``[since, now)``, oldest first."""
    out = []
    for i in intervals:
        start, end = max(float(i["start"]), since), min(float(i["end"]), now)
        if end > start:
            out.append({"state": i["state"], "start": start, "end": end, "live": False})
    return out


def downsample(samples: Sequence[Row], since: float, until: float,
               max_points: int = MAX_POINTS) -> list[dict[str, Any]]:
    """One GPU's samples (oldest first) as at most ``max_points`` points: the samples
    themselves when they are few, else the mean of each field per equal time bucket."""
    if len(samples) <= max_points:
        return [{"t": s["t"], **{f: s.get(f) for f in GPU_FIELDS},
                 "pstate": s.get("pstate_read")} for s in samples]
    width = (until - since) / max_points
    buckets: dict[int, list[Row]] = defaultdict(list)
    for s in samples:
        buckets[min(max_points - 1, int((float(s["t"]) - since) // width))].append(s)
    points = []
    for b in sorted(buckets):
        group = buckets[b]
        point: dict[str, Any] = {"t": sum(float(s["t"]) for s in group) / len(group)}
        for f in GPU_FIELDS:
            values = [float(s[f]) for s in group if s.get(f) is not None]
            point[f] = sum(values) / len(values) if values else None
        point["pstate"] = group[-1].get("pstate_read")
        points.append(point)
    return points


def woke_by(wake: Row, request: Row) -> bool:
    """Whether ``request`` (one that was held: outcome "woke") waited for ``wake``."""
    started = float(wake["started"])
    end = started + (wake.get("total_ms") or 0.0) / 1000
    return (request.get("node") == wake["node"] and request.get("ttfb_ms") is not None
            and started - WAKE_MATCH_S <= float(request["t"]) <= end)


def wake_steps(wake: Row, woke_requests: Sequence[Row]) -> dict[str, Any]:
    """One wake as a timeline in ms after its first packet: host up (resumed), port open,
    READY, and the first byte a request it woke got back (when history has that request)."""
    started = float(wake["started"])
    first_byte = None
    for r in woke_requests:
        if woke_by(wake, r):
            at = (float(r["t"]) - started) * 1000 + float(r["ttfb_ms"])
            first_byte = at if first_byte is None else min(first_byte, at)
    return {"started": started, "outcome": wake.get("outcome"), "reason": wake.get("reason", ""),
            "packets": wake.get("packets", 0), "total_ms": wake.get("total_ms"),
            "steps": {"packet": 0.0, "host_up": wake.get("host_up_ms"),
                      "port_open": wake.get("port_open_ms"), "ready": wake.get("ready_ms"),
                      "first_byte": first_byte}}


def busy_spans(spans: Sequence[Row], since: float, now: float) -> list[dict[str, float]]:
    """One GPU's busy spans clipped to ``[since, now)``, oldest first."""
    out = []
    for b in spans:
        start, end = max(float(b["start"]), since), min(float(b["end"]), now)
        if end > start:
            out.append({"start": start, "end": end})
    return out


def _connection(row: Row) -> dict[str, Any]:
    keys = ("t", "route", "bytes_up", "bytes_down", "duration_ms", "held_ms", "woke")
    return {k: row.get(k) for k in keys}


def build_summary(status: Mapping[str, Any], history: HistoryState, *, now: float,
                  window_s: float, cursor: str = "", incremental: bool = False) -> dict[str, Any]:
    """The JSON of ``GET /v1/dashboard/summary`` for the window ``[now - window_s, now]``;
    ``cursor`` goes back to the page, which sends it with its next poll."""
    since = now - window_s
    rows = history.rows
    live = status.get("nodes", {})
    models = served_models(status)
    names = sorted(set(live) | set(rows.nodes))
    gpus: dict[str, dict[str, list[Row]]] = defaultdict(lambda: defaultdict(list))
    for s in rows.gpu_samples:
        gpus[s["node"]][s["gpu_uuid"]].append(s)
    busy: dict[str, dict[str, list[Row]]] = defaultdict(lambda: defaultdict(list))
    for b in rows.busy_intervals:
        busy[b["node"]][b["gpu_uuid"]].append(b)
        gpus[b["node"]].setdefault(b["gpu_uuid"], [])
    energy = {r["node"]: dict(r) for r in rows.energy_week or ()}
    nodes = []
    for name in names:
        now_state = live.get(name)
        timeline = power_timeline([i for i in rows.power_intervals if i["node"] == name],
                                  since, now)
        if now_state is not None:
            timeline.append(live_segment(now_state, now, since))
        nodes.append({
            "name": name,
            "configured": now_state is not None,
            "state": now_state["state"] if now_state else None,
            "reason": now_state.get("reason") if now_state else None,
            "time_in_state_s": now_state.get("time_in_state_s") if now_state else None,
            "held": now_state.get("held", 0) if now_state else 0,
            "active": now_state.get("active", 0) if now_state else 0,
            "models": models.get(name, []),
            "power": timeline,
            "wakes": [wake_steps(w, rows.woke_requests) for w in rows.wakes
                      if w["node"] == name],
            "gpus": [{"uuid": uuid, "points": downsample(samples, since, now),
                      "busy": busy_spans(busy[name][uuid], since, now)}
                     for uuid, samples in sorted(gpus[name].items())],
            "connections": [_connection(c) for c in rows.connections if c["node"] == name],
            "energy_week": energy.get(name),
        })
    return {"now": now, "since": since, "window_s": window_s, "cursor": cursor,
            "incremental": incremental, "energy_included": rows.energy_week is not None,
            "history": {"enabled": history.enabled, "problem": history.problem},
            "nodes": nodes}
