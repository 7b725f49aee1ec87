"""The dashboard's routes on the control app: the page and its files (public: they hold no
data), and the JSON it polls (behind the control token like every other endpoint).

    GET /                          the page (index.html, dashboard.js, shared files)
    GET /v1/dashboard/summary?window_s=N       nodes, power, wakes, GPUs, energy (see summary)
    GET /v1/history/requests?since=T&until=T&node=N&model=M&limit=N   requests, newest first
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, Final
from urllib.parse import unquote_plus

import trio

from edge_proxy.dashboard.source import HistorySource
from edge_proxy.dashboard.summary import HistoryRows, HistoryState, build_summary
from shared.errors import LlamanapError
from shared.http import App, HTTPError, Request, Response
from shared.web import SHARED_ASSETS, add_assets

PAGE_PATH: Final = "/"
SUMMARY_PATH: Final = "/v1/dashboard/summary"
REQUESTS_PATH: Final = "/v1/history/requests"
ASSETS: Final = {PAGE_PATH: ("edge_proxy.dashboard", "index.html"),
                 "/static/dashboard.js": ("edge_proxy.dashboard", "dashboard.js"),
                 **SHARED_ASSETS}
PUBLIC_PATHS: Final = frozenset(ASSETS)
DEFAULT_WINDOW_S: Final = 6 * 3600.0
MIN_WINDOW_S: Final = 60.0
MAX_WINDOW_S: Final = 31 * 86400.0
# Requests per answer: the page draws each as a point; more than this is a wall of dots.
MAX_REQUEST_ROWS: Final = 5000

StatusSource = Callable[[], dict[str, Any]]
HistoryLookup = Callable[[], HistorySource | None]


def _number(req: Request, key: str, default: float, low: float, high: float) -> float:
    text = req.query.get(key)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not low <= value <= high:  # also refuses nan
        bounds = f"at least {_show(low)}" if math.isinf(high) \
            else f"from {_show(low)} to {_show(high)}"
        raise HTTPError(400, f"{key}={text!r}; expected a number {bounds}")
    return value


def _show(value: float) -> str:
    return str(int(value)) if value.is_integer() else f"{value:.3f}"


def _read_rows(source: HistorySource, since: float, now: float) -> HistoryRows:
    return HistoryRows(
        wakes=source.wakes(since, now),
        gpu_samples=source.gpu_samples(since, now),
        power_intervals=source.power_intervals(since, now),
        woke_requests=[r for r in source.requests(since, now, limit=MAX_REQUEST_ROWS)
                       if r["outcome"] == "woke"],
        energy_week=source.energy_week(now),
        nodes=source.nodes(),
    )


def dashboard_routes(app: App, status: StatusSource, history: HistoryLookup, *,
                     clock: Callable[[], float] = time.time) -> None:
    """Add the page, its files and its JSON to ``app``; ``status`` is ``Proxy.status``,
    ``history`` gives the history in use now (None while history is off)."""
    add_assets(app, ASSETS)

    @app.route("GET", SUMMARY_PATH)
    async def summary(req: Request) -> Response:
        window_s = _number(req, "window_s", DEFAULT_WINDOW_S, MIN_WINDOW_S, MAX_WINDOW_S)
        now = clock()
        source = history()
        state = HistoryState(enabled=source is not None)
        if source is not None:
            try:
                rows = await trio.to_thread.run_sync(_read_rows, source, now - window_s, now)
                state = HistoryState(enabled=True, rows=rows)
            except LlamanapError as exc:
                state = HistoryState(enabled=True, problem=str(exc))
        return Response.json(build_summary(status(), state, now=now, window_s=window_s))

    @app.route("GET", REQUESTS_PATH)
    async def requests(req: Request) -> Response:
        now = clock()
        since = _number(req, "since", now - DEFAULT_WINDOW_S, 0.0, math.inf)
        until = _number(req, "until", now, since, math.inf)
        limit = int(_number(req, "limit", MAX_REQUEST_ROWS, 1, MAX_REQUEST_ROWS))
        node, model = (None if v is None else unquote_plus(v)
                       for v in (req.query.get("node"), req.query.get("model")))
        source = history()
        if source is None:
            return Response.json({"history": {"enabled": False, "problem": None},
                                  "requests": []})
        try:
            rows = await trio.to_thread.run_sync(
                lambda: source.requests(since, until, node=node, model=model, limit=limit))
        except LlamanapError as exc:
            raise HTTPError(503, str(exc), "server_error") from exc
        return Response.json({"history": {"enabled": True, "problem": None},
                              "since": since, "until": until, "requests": list(rows)})
