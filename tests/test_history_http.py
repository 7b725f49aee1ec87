"""History on the request path: a proxy with ``[history]`` on, a real llama-server on the
sentence model behind an HTTP route, and the rows the requests and the wake left."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_proxy.history import query
from tests.support.history_stack import ALIAS, CHAT, sentence_stack

pytestmark = pytest.mark.llama


async def test_requests_leave_rows_with_llama_servers_numbers(
        tmp_path: Path, llama_server_bin: Path) -> None:
    async with sentence_stack(tmp_path, llama_server_bin) as stack:
        client, db = stack.client, stack.db
        # held while the node "wakes" (the packet starts llama-server), then relayed
        woke = await client.post("/v1/chat/completions", json=CHAT)
        assert woke.status_code == 200, woke.text
        stream = await client.post("/v1/chat/completions", json={
            **CHAT, "stream": True, "stream_options": {"include_usage": True}})
        assert stream.status_code == 200
        models = await client.get("/v1/models")
        assert models.status_code == 200
    # the recorder wrote its queue on the way out of serve_proxy
    with query.open_readonly(db) as conn:
        rows = list(reversed(query.requests(conn)))
        wakes = query.wakes(conn)
        intervals = query.power_intervals(conn)
    assert [(r.method, r.path, r.status) for r in rows] == [
        ("POST", "/v1/chat/completions", 200), ("POST", "/v1/chat/completions", 200),
        ("GET", "/v1/models", 200)]
    first, second, poll = rows
    assert first.outcome == "woke" and first.held_ms > 0
    assert first.ttfb_ms is not None and first.ttfb_ms >= first.held_ms
    assert second.outcome == "relayed" and second.held_ms == 0
    for row in (first, second):
        assert (row.node, row.model, row.route) == ("box", ALIAS, "127.0.0.1:0")
        # llama-server's own numbers: the sentence is 8 tokens
        assert row.predicted_tokens == 8 and row.prompt_tokens is not None
        assert row.predicted_per_s is not None and row.predicted_per_s > 0
        assert row.total_ms is not None and row.total_ms >= (row.ttfb_ms or 0)
    assert json.loads(woke.text)["usage"]["prompt_tokens"] == first.prompt_tokens
    assert poll.outcome == "relayed" and poll.predicted_tokens is None
    # the wake driver's rows: the one wake, and the node asleep until it, awake after
    (wake,) = wakes
    assert (wake.node, wake.outcome) == ("box", "ready")
    assert wake.packets >= 1 and wake.reason
    # steps: the host answers (loopback: at once), /health answers, the wake ends
    assert wake.host_up_ms is not None and wake.port_open_ms is not None
    assert wake.host_up_ms <= wake.port_open_ms <= (wake.ready_ms or 0) + 1
    assert wake.total_ms is not None and 0 < wake.total_ms <= first.held_ms + 1000
    assert [i.state for i in intervals] == ["asleep", "awake"]
    asleep, awake = intervals
    assert asleep.end == awake.start and awake.end > awake.start
    assert asleep.end == pytest.approx(wake.started, abs=0.05)  # WAKING draws awake power
