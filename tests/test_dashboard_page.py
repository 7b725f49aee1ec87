"""The proxy's dashboard at ``/`` on the control listener, loaded in a real headless Chromium
from an in-process proxy: the page draws what the JSON endpoints return, says plainly what
it has no data for, and keeps the control token rule for its data."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio

from edge_proxy.service import Proxy, serve_proxy
from shared.config.edge import load_edge_config
from tests.support.browser import load
from tests.support.edge_http import TOKEN, NodeSpec, write_http_config
from tests.support.ports import free_port

pytestmark = pytest.mark.browser


async def _proxy(nursery: trio.Nursery, tmp_path: Path) -> Proxy:
    nodes = [NodeSpec("gpubox", "02:00:00:00:00:01", free_port(), ("tiny", "qwen")),
             NodeSpec("spare", "02:00:00:00:00:02", free_port(), ("llama",))]
    cfg = write_http_config(tmp_path, nodes, free_port())
    proxy: Proxy = await nursery.start(serve_proxy, load_edge_config(cfg))
    return proxy


async def test_without_history_the_page_shows_the_nodes_and_says_history_is_off(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    proxy = await _proxy(nursery, tmp_path)
    async with httpx.AsyncClient(base_url=proxy.control_url,
                                 headers={"authorization": f"Bearer {TOKEN}"}) as api:
        summary = (await api.get("/v1/dashboard/summary")).json()
        answer = (await api.get("/v1/history/requests")).json()
    assert summary["history"] == {"enabled": False, "problem": None}
    assert answer["requests"] == []
    shot = tmp_path / "dashboard-no-history.png"
    page = await load(f"{proxy.control_url}/#token={TOKEN}", tmp_path, screenshot=shot)
    assert page.console == []
    assert 'data-loaded="true"' in page.dom
    assert page.count(kind="node") == 2
    for node in summary["nodes"]:
        assert page.count(kind="model", node=node["name"]) == len(node["models"])
        # each node's live state is one segment of its power timeline
        assert page.count(kind="power", node=node["name"]) == len(node["power"]) == 1
    assert page.dom.count("history is off: set [history] enabled = true") == 4
    assert page.count(kind="wake") == page.count(kind="ttft") == 0


async def test_the_data_needs_the_token_and_bad_parameters_say_what_is_allowed(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    proxy = await _proxy(nursery, tmp_path)
    async with httpx.AsyncClient(base_url=proxy.control_url) as anonymous:
        page = await anonymous.get("/")
        script = await anonymous.get("/static/dashboard.js")
        data = await anonymous.get("/v1/dashboard/summary")
        bad = await anonymous.get("/v1/dashboard/summary?window_s=nan",
                                  headers={"authorization": f"Bearer {TOKEN}"})
    assert page.status_code == 200 and "<title>llamanap · edge-proxy</title>" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert script.status_code == 200 and "text/javascript" in script.headers["content-type"]
    assert data.status_code == 401 and data.json()["error"]["source"] == "edge-proxy"
    assert bad.status_code == 400
    assert bad.json()["error"]["message"] == \
        "window_s='nan'; expected a number from 60 to 2678400"
    browsed = await load(proxy.control_url + "/", tmp_path)
    assert 'id="login-form"' in browsed.dom and browsed.count(kind="node") == 0
