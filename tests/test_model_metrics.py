"""Per-model metrics at the proxy (edge_proxy.http_routes.model_metrics) with a real
llama-server behind an HTTP route, and the Grafana dashboard that queries them."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Final

import httpx
import pytest
import trio
from prometheus_client import CollectorRegistry

from edge_proxy.service import Proxy, serve_proxy
from edge_proxy.wake.machine import State
from shared.config.edge import load_edge_config
from tests.support.edge import PacketListener
from tests.support.edge_http import (
    TEST_TIMEOUT_S,
    NodeSpec,
    llama_on_port,
    wait_state,
    write_http_config,
)
from tests.support.ports import free_port

DASHBOARD: Final = Path(__file__).parent.parent / "deploy" / "grafana" / "llamanap.json"
METRIC_NAME: Final = re.compile(r"\b((?:edge|llamanap)_[a-z0-9_]+)\b")
MODEL_ALIAS: Final = "tiny"


def exported_names(registry: CollectorRegistry) -> set[str]:
    """Every series name the registry can export (histograms' _bucket/_sum/_count, counters'
    _total), whether or not a labelled child exists yet."""
    names = set()
    for family in registry.collect():
        names.add(family.name)
        if family.type == "counter":
            names |= {family.name + "_total", family.name + "_created"}
        elif family.type == "histogram":
            names |= {family.name + s for s in ("_bucket", "_sum", "_count", "_created")}
    return names


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def test_every_metric_the_dashboard_queries_exists_in_the_proxy(tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    node = NodeSpec("box", "aa:bb:cc:dd:ee:01", free_port(), (MODEL_ALIAS,))
    proxy = Proxy(load_edge_config(write_http_config(tmp_path, [node], free_port())))
    known = exported_names(proxy.metrics.registry)
    queried = {}
    for panel in dashboard["panels"]:
        assert panel["targets"], f"panel {panel['title']!r} queries nothing"
        for target in panel["targets"]:
            names = METRIC_NAME.findall(target["expr"])
            assert names, f"panel {panel['title']!r}: no metric in {target['expr']!r}"
            queried.update(dict.fromkeys(names, panel["title"]))
    unknown = {name: title for name, title in queried.items() if name not in known}
    assert unknown == {}
    for needed in ("edge_http_time_to_first_token_seconds_bucket",
                   "edge_http_tokens_per_second_bucket", "edge_http_model_requests_total",
                   "edge_wakes_total", "edge_wake_failures_total", "edge_alerts_total"):
        assert needed in queried, f"the dashboard has no panel on {needed}"


@pytest.mark.llama
@pytest.mark.parametrize("history", [False, True], ids=["history off", "history on"])
async def test_a_streamed_answer_is_timed_per_model_and_counted_by_outcome(
        tmp_path: Path, llama_server_bin: Path, tiny_model: Path, history: bool) -> None:
    node = NodeSpec("box", "aa:bb:cc:dd:ee:01", free_port(), (MODEL_ALIAS,))
    packets = await PacketListener.open()
    path = write_http_config(tmp_path, [node], packets.port)
    if history:  # the meter then reads llama-server's numbers from the history row's parser
        db = tmp_path / "history.sqlite3"
        path.write_text(path.read_text() + f'\n[history]\nenabled = true\npath = "{db}"\n')
    cfg = load_edge_config(path)
    args = ("-c", "512", "-np", "1", "-t", "1", "--alias", MODEL_ALIAS)
    labels = {"node": "box", "model": MODEL_ALIAS}
    chat = {"model": MODEL_ALIAS, "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 8}
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery, \
                llama_on_port(llama_server_bin, tiny_model, node.port, args):
            proxy: Proxy = await nursery.start(serve_proxy, cfg)
            await wait_state(proxy, "box", State.AWAKE)
            url = proxy.http_routes.url("127.0.0.1:0")
            async with httpx.AsyncClient(base_url=url, timeout=TEST_TIMEOUT_S) as client:
                # The streamed one last: llama-server closes its connection after a stream,
                # and a request the proxy sends on it before the close is seen fails (502).
                plain = await client.post("/v1/chat/completions", json=chat)
                other = await client.post("/v1/chat/completions",
                                          json={**chat, "model": "not-served"})
                streamed = await client.post("/v1/chat/completions", json={**chat, "stream": True})
            # The proxy counts an answer once its last byte went out, which may trail the
            # client's read of it.
            r = proxy.metrics.registry
            while (sample(r, "edge_http_model_requests_total", outcome="relayed", **labels) < 2
                   or sample(r, "edge_http_model_requests_total", node="box", model="other",
                             outcome="relayed") < 1):
                await trio.sleep(0.02)
            nursery.cancel_scope.cancel()
    assert streamed.status_code == plain.status_code == 200
    assert streamed.headers["content-type"].startswith("text/event-stream")
    # llama-server's own speed, from the timings of both answers (SSE and JSON).
    assert sample(r, "edge_http_tokens_per_second_count", **labels) == 2
    assert sample(r, "edge_http_tokens_per_second_sum", **labels) > 0
    # Only the streamed answer has a first token to time; the plain one is one body.
    assert sample(r, "edge_http_time_to_first_token_seconds_count", **labels) == 1
    first_token_s = sample(r, "edge_http_time_to_first_token_seconds_sum", **labels)
    assert 0 < first_token_s < TEST_TIMEOUT_S
    assert sample(r, "edge_http_model_requests_total", outcome="relayed", **labels) == 2
    # A model the node does not serve is counted as "other", never under the client's string
    # (llama-server answers whatever a request's model says).
    assert other.status_code == 200
    assert sample(r, "edge_http_model_requests_total", node="box", model="other",
                  outcome="relayed") == 1
    assert sample(r, "edge_http_model_requests_total", node="box", model="not-served",
                  outcome="relayed") == 0
