"""Busy spans per GPU: the pure span keeper (inference_node.report.busy), and end to end a
real node-agent (recording NVML fake, a real llama-server on one of its GPUs) whose spans
reach a real edge-proxy's history database over the report channel."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
import trio

from edge_proxy.history import query
from inference_node.report.busy import BusySpan, BusySpans
from inference_node.supervisor import State
from tests.fakes.gpu import three_gpu_rig
from tests.support.ports import free_port
from tests.support.supervised import wait_state
from tests.test_report_service import (
    WAIT_S,
    agent_config,
    edge_config,
    start_agent,
    start_proxy,
    until,
)

# llama-server logs each task's start and end at -lv 4 (the activity parser reads them)
ARGS = ["-lv", "4", "-c", "256", "-np", "1", "-t", "1", "--no-warmup"]
GPU_1_BUS = "0000:41:00.0"  # CUDA index 1 (PCI bus order) on the three-GPU rig


def test_a_span_opens_on_busy_and_closes_on_idle() -> None:
    spans = BusySpans(max_span_s=60.0)
    assert spans.observe({"A", "B"}, 10.0) == []
    assert spans.observe({"B"}, 12.5) == [BusySpan("A", 10.0, 12.5)]
    assert spans.observe({"B"}, 13.0) == []  # still busy, not yet long
    assert spans.observe(set(), 20.0) == [BusySpan("B", 10.0, 20.0)]
    assert spans.observe(set(), 21.0) == []


def test_a_long_span_is_cut_so_the_proxy_sees_it_while_it_runs() -> None:
    spans = BusySpans(max_span_s=60.0)
    spans.observe({"A"}, 0.0)
    assert spans.observe({"A"}, 59.0) == []
    assert spans.observe({"A"}, 61.0) == [BusySpan("A", 0.0, 61.0)]
    assert spans.close(70.0) == [BusySpan("A", 61.0, 70.0)]
    assert spans.close(80.0) == []


def test_a_span_of_no_length_is_not_a_span() -> None:
    spans = BusySpans()
    spans.observe({"A"}, 5.0)
    assert spans.observe(set(), 5.0) == []


@pytest.mark.llama
async def test_busy_spans_of_a_real_llama_server_reach_the_proxys_history(
        tmp_path: Path, llama_server_bin: Path, tiny_model: Path) -> None:
    db = tmp_path / "history.sqlite3"
    control, port, rig = free_port(), free_port(), three_gpu_rig()
    gpu = rig.by_bus(GPU_1_BUS).uuid
    cfg = edge_config(tmp_path, control, free_port(), history={"enabled": True, "path": str(db)})
    instance = {"binary": str(llama_server_bin), "model": str(tiny_model), "port": port,
                "args": ARGS, "gpus": [1], "health": {"interval_s": 0.05}}
    async with trio.open_nursery() as nursery:
        running = await start_proxy(nursery, cfg)
        agent, parts = await start_agent(nursery, agent_config(
            tmp_path, control, {"tiny": instance}), rig)
        await wait_state(agent.supervisor, "tiny", State.READY)
        before = time.time()
        async with httpx.AsyncClient(timeout=WAIT_S) as client:
            for i in range(2):
                answer = await client.post(f"http://127.0.0.1:{port}/completion",
                                           json={"prompt": f"count {i}", "n_predict": 8})
                assert answer.status_code == 200, answer.text
        after = time.time()
        sink = running.sink
        await until(lambda: len(sink.busy_spans.get("box", ())) >= 2, "both tasks' spans")
        assert parts.report.busy_spans.observe(set(), time.time()) == []  # none left open
        agent.request_shutdown()
        await running.stop()  # the recorder writes what it holds as the proxy ends
        nursery.cancel_scope.cancel()
    with query.open_readonly(db) as conn:
        rows = query.busy_intervals(conn, query.Filter(node="box"))
    # one span per task, on the one GPU the instance runs on, within the requests' times
    assert [r.gpu_uuid for r in rows] == [gpu, gpu]
    assert all(before <= r.start < r.end <= after for r in rows)
    assert rows[0].end <= rows[1].start
    reported = list(sink.busy_spans["box"])
    assert [(r.start, r.end) for r in reported] == [(r.start, r.end) for r in rows]
