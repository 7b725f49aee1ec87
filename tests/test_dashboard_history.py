"""The dashboard over a real history database: rows written through the proxy's own
recorder, a proxy that reads them, and headless Chromium drawing exactly the points the
JSON endpoints return (power states, busy spans per GPU, wakes step by step, requests per
model, GPU series, TCP connections, energy saved this week in kWh and money), also after
polls that fetched only what was new."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import pytest
import trio

from edge_proxy.history.records import (
    BusyInterval,
    ConnectionRecord,
    GpuSample,
    PowerInterval,
    RequestRecord,
    WakeRecord,
)
from edge_proxy.history.store import HistoryRecorder, StoreLimits
from edge_proxy.service import Proxy, serve_proxy
from shared.config.edge import load_edge_config
from tests.support.browser import Loaded, load
from tests.support.devtools import open_browser
from tests.support.edge_http import TOKEN, NodeSpec, write_http_config
from tests.support.history_stack import ALIAS, CHAT, sentence_stack, with_history
from tests.support.ports import free_port

pytestmark = pytest.mark.browser

ROOMY = StoreLimits(retention_days=3650, max_bytes=1 << 30)
GPUS = ("GPU-5b2e91d4-7c1a-4f0e-9d3b-2a6c8e0f1a11", "GPU-c07f3a58-2e9b-4d61-8a0c-6b1d9e2f3c22")
SAMPLES_PER_GPU = 40
PRICE = 0.25
# Per GPU, when it had a task (seconds before now): the first GPU twice, the second once.
BUSY = {GPUS[0]: [(2350, 2300), (2200, 2000)], GPUS[1]: [(2100, 1900)]}


def _record(path: Path, now: float) -> None:
    """An afternoon of one node, written by the real recorder (its writer thread)."""
    recorder = HistoryRecorder(path, ROOMY)
    recorder.start()
    spans = [("asleep", 7200, 3600), ("awake", 3600, 2400), ("busy", 2400, 1800),
             ("awake", 1800, 1500), ("asleep", 1500, 300)]
    for state, start, end in spans:
        recorder.record_power_interval(PowerInterval("gpubox", state, now - start, now - end))
    recorder.record_power_interval(PowerInterval("retired", "asleep", now - 5000, now - 4000))
    for started, ready in ((now - 3600, 2500.0), (now - 300, 3100.0)):
        recorder.record_wake(WakeRecord("gpubox", started, "ready", "request for tiny",
                                        packets=3, host_up_ms=ready * 0.4,
                                        port_open_ms=ready * 0.7, ready_ms=ready,
                                        total_ms=ready + 50))
    recorder.record_wake(WakeRecord("gpubox", now - 200, "timeout", "no answer", packets=20))
    # The request that caused the second wake: held through it, then its first byte.
    recorder.record_request(RequestRecord(now - 300.05, "127.0.0.1:0", "gpubox", "tiny", "POST",
                                          "/v1/chat/completions", 200, "woke", held_ms=3150.0,
                                          ttfb_ms=3400.0, total_ms=3900.0, prompt_tokens=12,
                                          predicted_tokens=16, prompt_per_s=300.0,
                                          predicted_per_s=41.0))
    for i in range(6):
        recorder.record_request(RequestRecord(now - 3000 + i * 200, "127.0.0.1:0", "gpubox",
                                              "tiny", "POST", "/v1/chat/completions", 200,
                                              "relayed", ttfb_ms=80.0 + i, total_ms=600.0,
                                              predicted_tokens=16,
                                              predicted_per_s=40.0 + i))
    for i in range(3):  # no llama-server timings on these: a first byte, no tokens/s
        recorder.record_request(RequestRecord(now - 2500 + i * 100, "127.0.0.1:0", "gpubox",
                                              "qwen", "POST", "/v1/completions", 200,
                                              "relayed", ttfb_ms=150.0 + i))
    recorder.record_request(RequestRecord(now - 100, "127.0.0.1:0", "gpubox", None, "GET",
                                          "/v1/models", 200, "cache"))
    for uuid in GPUS:
        for i in range(SAMPLES_PER_GPU):
            t = now - 3600 + i * 60
            recorder.record_gpu_sample(GpuSample(t, "gpubox", uuid,
                                                 utilization_pct=90.0 if 20 <= i < 30 else 0.0,
                                                 memory_used_mib=1200.0 + i,
                                                 temperature_c=None if i == 5 else 40.0 + i / 2,
                                                 power_w=60.0 + (i % 7), pstate_read=8))
    recorder.close()  # writes everything queued, then joins the writer
    assert recorder.counts.written == 6 + 3 + 11 + 2 * SAMPLES_PER_GPU


def _record_more(path: Path, now: float) -> None:
    """The same afternoon's busy spans (the agent's reports) and its TCP route's connections."""
    recorder = HistoryRecorder(path, ROOMY)
    recorder.start()
    for uuid, spans in BUSY.items():
        for start, end in spans:
            recorder.record_busy_interval(BusyInterval("gpubox", uuid, now - start, now - end))
    recorder.record_connection(ConnectionRecord(now - 3590, "127.0.0.1:2222", "gpubox", 4096,
                                                1 << 20, 60_000.0, 2400.0, True))
    for i in range(2):
        recorder.record_connection(ConnectionRecord(now - 1700 + i * 60, "127.0.0.1:2222",
                                                    "gpubox", 512, 2048, 1500.0))
    recorder.close()
    assert recorder.counts.written == 3 + 3


async def _proxy(nursery: trio.Nursery, tmp_path: Path, db: Path) -> Proxy:
    nodes = [NodeSpec("gpubox", "02:00:00:00:00:01", free_port(), ("tiny", "qwen"))]
    cfg = write_http_config(tmp_path, nodes, free_port())
    with_history(cfg, db)
    cfg.write_text(cfg.read_text() + f'price_per_kwh = {PRICE}\ncurrency = "EUR"\n')
    proxy: Proxy = await nursery.start(serve_proxy, load_edge_config(cfg))
    return proxy


def _cell(page: Loaded, kind: str, node: str) -> str:
    m = re.search(f'data-kind="{kind}" data-node="{node}">([^<]*)<', page.dom)
    assert m, f"no {kind} cell for {node}"
    return m.group(1)


async def test_the_page_draws_the_points_the_api_returns(nursery: trio.Nursery,
                                                         tmp_path: Path) -> None:
    db = tmp_path / "history.sqlite3"
    now = time.time()
    await trio.to_thread.run_sync(_record, db, now)
    await trio.to_thread.run_sync(_record_more, db, now)
    proxy = await _proxy(nursery, tmp_path, db)
    async with httpx.AsyncClient(base_url=proxy.control_url,
                                 headers={"authorization": f"Bearer {TOKEN}"}) as api:
        summary = (await api.get("/v1/dashboard/summary")).json()
        answer = (await api.get("/v1/history/requests",
                                params={"since": summary["since"]})).json()
        tiny_only = (await api.get("/v1/history/requests", params={"model": "tiny"})).json()
    shot = tmp_path / "dashboard.png"
    page = await load(f"{proxy.control_url}/#token={TOKEN}", tmp_path, screenshot=shot)
    assert page.console == []
    assert 'data-loaded="true"' in page.dom

    nodes = {n["name"]: n for n in summary["nodes"]}
    assert set(nodes) == {"gpubox", "retired"}  # history remembers a node the config dropped
    gpubox = nodes["gpubox"]
    # power: five closed intervals and the live state
    assert len(gpubox["power"]) == 6 and gpubox["power"][-1]["live"]
    assert page.count(kind="power", node="gpubox") == 6
    assert page.count(kind="power", node="gpubox", state="busy") == 1
    assert page.count(kind="power", node="retired") == 1
    # wakes: each drawn with the steps it reached; the first byte from the request it woke
    assert page.count(kind="wake", node="gpubox") == len(gpubox["wakes"]) == 3
    reached = sum(v is not None for w in gpubox["wakes"] for v in w["steps"].values())
    assert page.count(kind="wake-step") == reached == 5 + 4 + 1
    first = [w["steps"]["first_byte"] for w in gpubox["wakes"] if w["steps"]["first_byte"]]
    assert first == [pytest.approx(3350.0)] and page.count(step="first_byte") == 1
    # requests per model: one dot per request that has the number
    rows = answer["requests"]
    assert len(rows) == 11 and len(tiny_only["requests"]) == 7
    for model in ("tiny", "qwen"):
        mine = [r for r in rows if r["model"] == model]
        assert page.count(kind="ttft", model=model) == \
            sum(r["ttfb_ms"] is not None for r in mine)
        assert page.count(kind="tps", model=model) == \
            sum(r["predicted_per_s"] is not None for r in mine)
    assert page.count(kind="ttft", model="tiny") == 7 and page.count(kind="tps", model="qwen") == 0
    assert page.count(kind="model-count") == 3  # tiny, qwen and the model-less /v1/models
    # GPUs: every sample a point (few enough not to be bucketed), a null temperature skipped
    assert [g["uuid"] for g in gpubox["gpus"]] == list(GPUS)
    for gpu in gpubox["gpus"]:
        assert len(gpu["points"]) == SAMPLES_PER_GPU
        assert page.count(kind="gpu-activity", gpu=gpu["uuid"]) == SAMPLES_PER_GPU
        for field in ("temperature_c", "power_w", "memory_used_mib"):
            drawn = re.search(f'data-kind="gpu-{field}" data-gpu="{gpu["uuid"]}" '
                              f'data-node="gpubox" data-points="(\\d+)"', page.dom)
            assert drawn, f"no {field} line for {gpu['uuid']}"
            assert int(drawn.group(1)) == sum(p[field] is not None for p in gpu["points"])
    assert page.dom.count('data-points="39"') == 2  # the temperature lines, one gap each
    # energy: this week's saving, as the API computed it
    energy = gpubox["energy_week"]
    assert energy["asleep_s"] > 0 and energy["saved_kwh"] > 0
    assert _cell(page, "saved-kwh", "gpubox") == f'{energy["saved_kwh"]:.3f} kWh'
    assert shot.stat().st_size > 30_000
    # ... and in money at the configured price; busy time includes the GPUs' busy spans
    assert energy["saved_money"] == pytest.approx(energy["saved_kwh"] * PRICE)
    assert _cell(page, "saved-money", "gpubox") == f'{energy["saved_money"]:.2f} EUR'
    assert _cell(page, "used-money", "gpubox") == f'{energy["used_money"]:.2f} EUR'
    assert energy["busy_s"] > 0
    # busy spans: one bar per span on its GPU's row of the power timeline
    for gpu in gpubox["gpus"]:
        assert [(b["start"], b["end"]) for b in gpu["busy"]] == [
            (pytest.approx(now - a), pytest.approx(now - b)) for a, b in BUSY[gpu["uuid"]]]
        assert page.count(kind="gpu-busy", gpu=gpu["uuid"]) == len(BUSY[gpu["uuid"]])
    # TCP connections: each a row, with its bytes, duration and whether it woke the node
    conns = gpubox["connections"]
    assert len(conns) == 3 and page.count(kind="connection", node="gpubox") == 3
    assert _cell(page, "connection-count", "gpubox") == \
        "gpubox: 3 connection(s), 5.0 KiB up, 1.0 MiB down, 1 woke the node"
    # The page polled again within its virtual time, asking only for what was new (nothing):
    # what it draws after merging is still exactly the API's whole answer.
    polls = re.search(r'data-polls="(\d+)" data-incremental-polls="(\d+)"', page.dom)
    assert polls and int(polls.group(2)) >= 1


async def test_history_on_but_nothing_recorded_yet_says_so(nursery: trio.Nursery,
                                                          tmp_path: Path) -> None:
    proxy = await _proxy(nursery, tmp_path, tmp_path / "not-yet.sqlite3")
    page = await load(f"{proxy.control_url}/#token={TOKEN}", tmp_path)
    assert page.console == []
    assert "no wakes recorded yet" in page.dom
    assert "no requests recorded in this window" in page.dom
    assert "no GPU samples recorded in this window" in page.dom
    assert "no power states recorded this week yet" in page.dom
    assert page.count(kind="power", node="gpubox") == 1  # the live state is still drawn


async def test_rows_recorded_while_the_page_is_open_appear_without_a_reload(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    db = tmp_path / "history.sqlite3"
    now = time.time()
    await trio.to_thread.run_sync(_record, db, now)
    proxy = await _proxy(nursery, tmp_path, db)
    async with open_browser(tmp_path) as browser:
        page = await browser.open(f"{proxy.control_url}/#token={TOKEN}")
        await page.wait_for("document.body?.dataset.loaded === 'true'")
        assert await page.count('[data-kind="ttft"][data-model="tiny"]') == 7
        assert await page.count('[data-kind="wake"]') == 3

        async with httpx.AsyncClient(base_url=proxy.control_url,
                                     headers={"authorization": f"Bearer {TOKEN}"}) as api:
            before = (await api.get("/v1/dashboard/summary")).json()
            bad = await api.get("/v1/dashboard/summary", params={"cursor": "gpu:1"})
            assert bad.status_code == 400 and "expected table:id" in bad.text

            def more() -> None:  # a later wake and the request it woke, the agent's late
                recorder = HistoryRecorder(db, ROOMY)  # reports, and a connection
                recorder.start()
                t = time.time()
                recorder.record_wake(WakeRecord("gpubox", t - 5, "ready", "request for tiny",
                                                packets=2, host_up_ms=800.0,
                                                port_open_ms=1200.0, ready_ms=2000.0,
                                                total_ms=2050.0))
                recorder.record_request(RequestRecord(t - 5, "127.0.0.1:0", "gpubox", "tiny",
                                                      "POST", "/v1/chat/completions", 200,
                                                      "woke", held_ms=2050.0, ttfb_ms=2300.0,
                                                      predicted_per_s=39.0))
                for uuid in GPUS:  # one taken long ago, sent only now (the agent was away)
                    recorder.record_gpu_sample(GpuSample(t - 1210, "gpubox", uuid,
                                                         power_w=70.0, temperature_c=50.0))
                    recorder.record_gpu_sample(GpuSample(t - 2, "gpubox", uuid, power_w=61.0,
                                                         temperature_c=45.0))
                recorder.record_busy_interval(BusyInterval("gpubox", GPUS[1], t - 4, t - 3))
                recorder.record_power_interval(PowerInterval("gpubox", "awake", t - 300, t - 6))
                recorder.record_connection(ConnectionRecord(t - 8, "127.0.0.1:2222", "gpubox",
                                                            100, 200, 50.0))
                recorder.close()

            await trio.to_thread.run_sync(more)
            await page.wait_for("document.querySelectorAll("
                                "'[data-kind=\"ttft\"][data-model=\"tiny\"]').length === 8 && "
                                "document.querySelectorAll('[data-kind=\"connection\"]')"
                                ".length === 1")
            assert await page.count('[data-kind="wake"]') == 4
            assert await page.count('[data-step="first_byte"]') == 2
            await page.screenshot(tmp_path / "dashboard-live.png")
            assert page.console == []
            # The API, asked with the cursor of the answer before: only the new rows.
            new = (await api.get("/v1/dashboard/summary",
                                 params={"cursor": before["cursor"]})).json()
            assert new["incremental"] and not new["energy_included"]
            (fresh,) = [n for n in new["nodes"] if n["name"] == "gpubox"]
            assert [len(g["points"]) for g in fresh["gpus"]] == [2, 2]
            assert [len(g["busy"]) for g in fresh["gpus"]] == [0, 1]
            assert len(fresh["connections"]) == 1 and len(fresh["wakes"]) == 1
            assert [p["live"] for p in fresh["power"]] == [False, True]
            # What the page drew from its polls is what the whole window holds now.
            whole = (await api.get("/v1/dashboard/summary")).json()
        (box,) = [n for n in whole["nodes"] if n["name"] == "gpubox"]
        assert await page.count('[data-kind="power"][data-node="gpubox"]') == len(box["power"])
        for gpu in box["gpus"]:
            assert len(gpu["points"]) == SAMPLES_PER_GPU + 2
            for kind, key in (("gpu-activity", "points"), ("gpu-busy", "busy")):
                assert await page.count(f'[data-kind="{kind}"][data-gpu="{gpu["uuid"]}"]') \
                    == len(gpu[key])
            drawn = await page.evaluate(
                f'document.querySelector(\'[data-kind="gpu-power_w"][data-gpu="{gpu["uuid"]}"]\')'
                '.getAttribute("data-points")')
            assert int(drawn) == SAMPLES_PER_GPU + 2
        assert await page.count('[data-kind="connection"]') == len(box["connections"]) == 1
        assert await page.count('[data-kind="wake"]') == len(box["wakes"])
        assert int(await page.evaluate("document.body.dataset.incrementalPolls")) >= 1
        assert page.console == []


@pytest.mark.llama
async def test_a_real_wake_and_real_requests_show_on_the_dashboard(
        tmp_path: Path, llama_server_bin: Path) -> None:
    async with sentence_stack(tmp_path, llama_server_bin) as stack:
        proxy = stack.proxy
        for _ in range(2):  # the first wakes the node, the second finds it awake
            answer = await stack.client.post("/v1/chat/completions", json=CHAT)
            assert answer.status_code == 200, answer.text
        async with httpx.AsyncClient(base_url=proxy.control_url, headers={
                "authorization": f"Bearer {TOKEN}"}) as api:
            while True:  # the writer thread flushes every half second
                summary = (await api.get("/v1/dashboard/summary")).json()
                rows = (await api.get("/v1/history/requests")).json()["requests"]
                if summary["nodes"][0]["wakes"] and len(rows) == 2:
                    break
                await trio.sleep(0.1)
        shot = tmp_path / "dashboard-real.png"
        page = await load(f"{proxy.control_url}/#token={TOKEN}", tmp_path, screenshot=shot)
    assert page.console == []
    (wake,) = summary["nodes"][0]["wakes"]
    assert wake["outcome"] == "ready" and wake["steps"]["ready"] is not None
    # the request that woke the node gave the wake its first byte, after READY
    assert wake["steps"]["first_byte"] is not None
    assert wake["steps"]["first_byte"] >= wake["steps"]["ready"]
    assert page.count(kind="wake", node="box") == 1 and page.count(step="first_byte") == 1
    # time to first token and llama-server's own tokens/s, one dot per request
    assert all(r["model"] == ALIAS and r["predicted_per_s"] for r in rows)
    assert page.count(kind="ttft", model=ALIAS) == page.count(kind="tps", model=ALIAS) == 2
    states = [p["state"] for p in summary["nodes"][0]["power"]]
    assert "asleep" in states and states[-1] in ("awake", "busy")
    assert page.count(kind="power", node="box") == len(states)
