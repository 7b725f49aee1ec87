"""The dashboard's routes on the control app: the page and its files (public: they hold no
data), and the JSON it polls (behind the control token like every other endpoint).

    GET /                          the page (index.html, dashboard.js, merge.js, shared files)
    GET /v1/dashboard/summary?window_s=N[&cursor=C[&energy=1]]
                                   nodes, power, wakes, GPUs, connections, energy (see
                                   summary); with the cursor of the last answer, only what
                                   was written since (this week's energy only with energy=1)
    GET /v1/history/requests?since=T&until=T&node=N&model=M&limit=N[&cursor=ID]
                                   requests, newest first; with a cursor, only those written
                                   after the request row ``ID`` (the last answer's ``cursor``)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, Final
from urllib.parse import unquote_plus

import trio

from edge_proxy.dashboard.cursor import Cursor, CursorError
from edge_proxy.dashboard.reading import MAX_REQUEST_ROWS, read_rows
from edge_proxy.dashboard.source import HistorySource
from edge_proxy.dashboard.summary import HistoryState, build_summary
from shared.errors import LlamanapError
from shared.http import App, HTTPError, Request, Response
from shared.web import SHARED_ASSETS, add_assets

PAGE_PATH: Final = "/"
SUMMARY_PATH: Final = "/v1/dashboard/summary"
REQUESTS_PATH: Final = "/v1/history/requests"
ASSETS: Final = {PAGE_PATH: ("edge_proxy.dashboard", "index.html"),
                 "/static/dashboard.js": ("edge_proxy.dashboard", "dashboard.js"),
                 "/static/merge.js": ("edge_proxy.dashboard", "merge.js"),
                 **SHARED_ASSETS}
PUBLIC_PATHS: Final = frozenset(ASSETS)
DEFAULT_WINDOW_S: Final = 6 * 3600.0
MIN_WINDOW_S: Final = 60.0
MAX_WINDOW_S: Final = 31 * 86400.0

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


def _cursor(req: Request) -> Cursor | None:
    text = req.query.get("cursor")
    if text is None:
        return None
    try:
        return Cursor.decode(unquote_plus(text))
    except CursorError as exc:
        raise HTTPError(400, f"{exc}; send back the cursor of the last answer") from exc


def dashboard_routes(app: App, status: StatusSource, history: HistoryLookup, *,
                     clock: Callable[[], float] = time.time) -> None:
    """Add the page, its files and its JSON to ``app``; ``status`` is ``Proxy.status``,
    ``history`` gives the history in use now (None while history is off)."""
    add_assets(app, ASSETS)

    @app.route("GET", SUMMARY_PATH)
    async def summary(req: Request) -> Response:
        window_s = _number(req, "window_s", DEFAULT_WINDOW_S, MIN_WINDOW_S, MAX_WINDOW_S)
        previous = _cursor(req)
        energy = previous is None or req.query.get("energy") == "1"
        now = clock()
        source = history()
        state = HistoryState(enabled=source is not None)
        cursor = previous
        if source is not None:
            try:
                rows, cursor = await trio.to_thread.run_sync(
                    lambda: read_rows(source, now - window_s, now, previous, energy=energy))
                state = HistoryState(enabled=True, rows=rows)
            except LlamanapError as exc:
                state = HistoryState(enabled=True, problem=str(exc))
        return Response.json(build_summary(
            status(), state, now=now, window_s=window_s,
            cursor=cursor.encode() if cursor is not None else "",
            incremental=previous is not None))

    @app.route("GET", REQUESTS_PATH)
    async def requests(req: Request) -> Response:
        now = clock()
        after = None if "cursor" not in req.query else int(_number(req, "cursor", 0, 0, 2**62))
        since = _number(req, "since", now - DEFAULT_WINDOW_S, 0.0, math.inf)
        # with a cursor, no end by default: a row the cursor passes over would never come again
        until = _number(req, "until", now if after is None else math.inf, since, math.inf)
        limit = int(_number(req, "limit", MAX_REQUEST_ROWS, 1, MAX_REQUEST_ROWS))
        node, model = (None if v is None else unquote_plus(v)
                       for v in (req.query.get("node"), req.query.get("model")))
        source = history()
        if source is None:
            return Response.json({"history": {"enabled": False, "problem": None},
                                  "requests": []})

        def read() -> tuple[int, list[Any]]:
            assert source is not None
            through = source.latest_ids().get("requests", 0)
            return through, list(source.requests(since, until, node=node, model=model,
                                                 limit=limit, after=after, through=through))

        try:
            cursor, rows = await trio.to_thread.run_sync(read)
        except LlamanapError as exc:
            raise HTTPError(503, str(exc), "server_error") from exc
        return Response.json({"history": {"enabled": True, "problem": None},
                              "since": since, "until": None if math.isinf(until) else until,
                              "cursor": cursor,
                              "incremental": after is not None, "requests": rows})
