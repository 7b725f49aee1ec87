"""What the node reports, end to end: a real node-agent (on the recording NVML fake, with real
toy instances and a real suspend command) and a real edge-proxy in this process, over
loopback HTTP. GPU samples reach the proxy; a proxy restart in between loses none of them
(the agent keeps and resends them, each stored once); the proxy raises alerts from them and
runs a real alert command."""

from __future__ import annotations

import functools
import gc
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import tomli_w
import trio

from edge_proxy.cli import format_status
from edge_proxy.errors import ListenError
from edge_proxy.history import query
from edge_proxy.reports.history_sink import HistorySink
from edge_proxy.reports.sink import MemorySink
from edge_proxy.service import Proxy, serve_proxy
from inference_node.agent import Agent, Component, Parts, build_parts, run_agent
from inference_node.power.policy import PowerState
from inference_node.supervisor import State
from shared.config.edge import load_edge_config
from shared.reports import ReportBatch
from tests.fakes.gpu import FakeNvml, FakeRig, RecordingBackend, three_gpu_rig
from tests.support.ports import free_port
from tests.support.supervised import toy_command, wait_state

TOKEN = "report-test-token"
MAC = "02:00:00:00:00:09"
WAIT_S = 60.0  # bounds a hang on a loaded machine; never a speed check
FAST = {"restart": {"backoff_initial_s": 0.05, "backoff_max_s": 0.1},
        "health": {"interval_s": 0.05}, "stop_timeout_s": 5}


def token_file(folder: Path) -> Path:
    path = folder / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


def edge_config(folder: Path, control_port: int, wol_port: int, backend_port: int | None = None,
                history: dict[str, Any] | None = None, **alerts: Any) -> Path:
    path = folder / "edge-proxy.toml"
    path.write_text(tomli_w.dumps({
        "log_level": "debug",
        "control": {"listen": f"127.0.0.1:{control_port}", "token_file": str(token_file(folder))},
        "nodes": {"box": {"host": "127.0.0.1", "mac": MAC,
                          "wol": {"broadcast": "127.0.0.1", "port": wol_port},
                          "wol_interval_s": 0.2, "wake_timeout_s": 30, "probe_interval_s": 0.05,
                          "probe_timeout_s": 0.5}},
        "routes": [{"listen": "127.0.0.1:0", "node": "box",
                    "backend_port": backend_port or free_port(), "ready": "http:/health"}],
        "alerts": alerts,
        "history": history or {},
    }))
    return path


def agent_config(folder: Path, control_port: int, instances: dict[str, Any],
                 power: dict[str, Any] | None = None, api_port: int = 0,
                 buffer_records: int = 20_000) -> Path:
    path = folder / "node-agent.toml"
    path.write_text(tomli_w.dumps({
        "log_level": "debug",
        "agent": {"node": "box", "api_listen": f"127.0.0.1:{api_port}", "token": TOKEN,
                  "state_file": str(folder / "state.toml")},
        "proxy": {"url": f"http://127.0.0.1:{control_port}", "token_file": str(token_file(folder)),
                  "timeout_s": 1.0},
        "report": {"sample_interval_s": 0.05, "send_interval_s": 0.05, "batch_records": 20,
                   "buffer_records": buffer_records},
        "power": power or {"enabled": False},
        "pstate": {"low_delay_s": 0.1},
        "instances": instances,
    }))
    return path


@dataclass
class RunningProxy:
    proxy: Proxy
    ended: trio.Event

    @property
    def sink(self) -> MemorySink:
        sink = self.proxy.report_sink
        if isinstance(sink, HistorySink):  # history on: the newest also stay in memory
            return sink.memory
        assert isinstance(sink, MemorySink)
        return sink

    def seqs(self) -> list[int]:
        s = self.sink
        rows = [*s.gpu.get("box", ()), *s.instances.get("box", ()), *s.cycles.get("box", ())]
        return sorted(r.seq for r in rows)

    async def stop(self) -> None:
        self.proxy.stop()
        with trio.fail_after(WAIT_S):
            await self.ended.wait()


async def restart_proxy(nursery: trio.Nursery, cfg: Path) -> RunningProxy:
    """A new proxy on the stopped one's control port. In one process the old listening
    socket can outlive its proxy for a moment (closed when collected): try again until
    the port is free."""
    with trio.fail_after(WAIT_S):
        while True:
            gc.collect()
            try:
                return await start_proxy(nursery, cfg)
            except BaseExceptionGroup as group:  # the proxy's nurseries wrap its ListenError
                if group.subgroup(ListenError) is None:
                    raise
            await trio.sleep(0.05)


async def start_proxy(nursery: trio.Nursery, cfg: Path) -> RunningProxy:
    ended = trio.Event()

    async def serve(*, task_status: trio.TaskStatus[Proxy]) -> None:
        try:
            await serve_proxy(load_edge_config(cfg), task_status=task_status)
        finally:
            ended.set()

    proxy: Proxy = await nursery.start(serve)
    return RunningProxy(proxy, ended)


async def start_agent(nursery: trio.Nursery, cfg: Path, rig: FakeRig) -> tuple[Agent, Parts]:
    made: list[Parts] = []

    def components(agent: Agent) -> list[Component]:
        made.append(build_parts(agent, inventory=FakeNvml(rig), backend=RecordingBackend(rig),
                                watch_system=False))
        return made[-1].components()

    agent: Agent = await nursery.start(functools.partial(
        run_agent, cfg, handle_signals=False, make_components=components))
    return agent, made[0]


async def until(condition: Callable[[], bool], what: str) -> None:
    with trio.fail_after(WAIT_S):
        while not condition():
            await trio.sleep(0.02)


async def test_gpu_samples_and_instance_changes_reach_the_proxy(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    control, rig = free_port(), three_gpu_rig()
    running = await start_proxy(nursery, edge_config(tmp_path, control, free_port()))
    agent, parts = await start_agent(nursery, agent_config(
        tmp_path, control, {"web": {"command": toy_command(free_port()), **FAST}}), rig)
    await wait_state(agent.supervisor, "web", State.READY)
    sink = running.sink
    await until(lambda: len(sink.gpu.get("box", ())) >= 9 and sink.instances.get("box"),
                "three rounds of samples and the instance's load reached the proxy")
    samples = list(sink.gpu["box"])
    assert {s.gpu_uuid for s in samples} == {g.uuid for g in rig.gpus}
    first = samples[0]
    assert (first.temperature_c, first.memory_used_mib, first.memory_total_mib, first.power_w) \
        == (30.0, 576.0, 24576.0, 9.5)
    # The controller wants P8 for an idle GPU once low_delay_s passed, and NVML reads it back.
    await until(lambda: any(s.pstate_wanted == 8 and s.pstate_read == 8
                            for s in sink.gpu["box"]), "a low P-state wanted and read back")
    loaded = sink.instances["box"][0]
    assert (loaded.instance, loaded.change, loaded.state) == ("web", "loaded", "READY")
    agent.supervisor.set_enabled("web", False, "test: unload it")
    await until(lambda: sink.instances["box"][-1].change == "unloaded", "the unload reported")
    status = parts.report.status()
    assert status["dropped"] == 0 and status["last_error"] == ""
    metrics = running.proxy.metrics.registry
    assert (metrics.get_sample_value("edge_reports_total", {"node": "box", "kind": "gpu"})
            or 0) >= 9


async def test_a_proxy_restart_loses_no_sample_and_stores_none_twice(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    control, rig = free_port(), three_gpu_rig()
    cfg = edge_config(tmp_path, control, free_port())
    first = await start_proxy(nursery, cfg)
    _, parts = await start_agent(nursery, agent_config(tmp_path, control, {}), rig)
    report = parts.report
    await until(lambda: len(first.seqs()) >= 6, "samples reached the first proxy")
    await first.stop()
    stored_before = first.seqs()
    # While no proxy listens the agent keeps sampling and keeps what it cannot send.
    await until(lambda: len(report.buffer) >= 30 and report.last_error != "",
                "records kept while the proxy was down")
    # A batch the first proxy stored as it stopped may not have had its answer reach the
    # agent: the agent keeps (and resends) exactly what was not acknowledged.
    acknowledged = report.buffer.stored
    kept_from = report.buffer.oldest(1)[0].seq
    assert kept_from == acknowledged + 1 and acknowledged <= stored_before[-1]
    second = await restart_proxy(nursery, cfg)
    await until(lambda: len(second.seqs()) >= 30 + 6, "the kept records and new ones arrived")
    await until(lambda: report.last_error == "", "the agent saw the proxy store again")
    stored_after = second.seqs()
    assert stored_after[0] == kept_from
    assert len(stored_after) == len(set(stored_after))
    everything = sorted(set(stored_before) | set(stored_after))
    assert everything == list(range(1, everything[-1] + 1))  # none lost
    # Only records stored but never acknowledged can be in both (memory does not outlive a
    # proxy; a durable store keeps its marks with the rows).
    assert set(stored_before) & set(stored_after) <= set(range(acknowledged + 1,
                                                               stored_before[-1] + 1))
    mark = second.proxy.reports.marks["box"]
    assert mark.stream == report.stream and mark.stored_through == stored_after[-1]
    assert report.buffer.dropped == 0
    times = [r.t for r in second.sink.gpu["box"]]
    assert times == sorted(times)  # sent later, in the order they were taken


async def test_beyond_the_buffer_the_oldest_go_and_both_sides_count_them(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    control, rig = free_port(), three_gpu_rig()
    cfg = edge_config(tmp_path, control, free_port())
    first = await start_proxy(nursery, cfg)
    _, parts = await start_agent(nursery, agent_config(tmp_path, control, {},
                                                       buffer_records=12), rig)
    report = parts.report
    await until(lambda: len(first.seqs()) >= 3, "samples reached the first proxy")
    await first.stop()
    last_stored = first.seqs()[-1]
    # More dropped than the ring holds: every record kept at the stop is gone, including any
    # the first proxy stored without its answer reaching the agent.
    await until(lambda: report.buffer.dropped >= 20, "the ring overflowed")
    unanswered = last_stored - report.buffer.stored
    second = await restart_proxy(nursery, cfg)
    await until(lambda: report.last_error == "" and len(second.seqs()) >= 12, "sent again")
    dropped = second.proxy.metrics.registry.get_sample_value("edge_reports_agent_dropped",
                                                             {"node": "box"})
    assert dropped is not None and dropped >= 20
    stored = second.seqs()
    # What is missing between the two proxies is exactly what the agent said it dropped (as
    # of the last batch, which is what the gauge shows), less what the first one had.
    missing = set(range(last_stored + 1, stored[-1] + 1)) - set(stored)
    assert len(missing) == dropped - unanswered
    assert min(missing) == last_stored + 1 and len(stored) == len(set(stored))


async def test_a_resend_after_a_lost_reply_is_stored_once(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    control, rig = free_port(), three_gpu_rig()
    running = await start_proxy(nursery, edge_config(tmp_path, control, free_port()))
    _, parts = await start_agent(nursery, agent_config(tmp_path, control, {}), rig)
    await until(lambda: len(running.seqs()) >= 3, "samples arrived")
    report = parts.report
    # The same records again, as a retry after a lost reply sends them (the agent's own
    # client, over HTTP): skipped, not stored.
    batch = running.proxy.reports.marks["box"]
    again = [*running.sink.gpu["box"]][:3]
    assert report.client is not None
    reply = await report.client.send(ReportBatch("box", report.stream, tuple(again)))
    assert reply.duplicates == 3 and reply.stored_through == batch.stored_through
    seqs = running.seqs()
    assert len(seqs) == len(set(seqs))
    assert running.proxy.metrics.registry.get_sample_value(
        "edge_reports_duplicates_total", {"node": "box"}) == 3


async def test_a_sleep_cycle_reaches_the_proxy_with_its_step_times_and_nothing_is_lost(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    control, wol, api, backend, rig = free_port(), free_port(), free_port(), free_port(), \
        three_gpu_rig()
    running = await start_proxy(nursery, edge_config(tmp_path, control, wol, backend))
    # The "suspend" blocks until the proxy's magic packet reaches 127.0.0.1:wol, then reports
    # the resume through the agent's API, as the system-sleep hook does.
    suspend = [sys.executable, "-m", "inference_node", "simulate-sleep", "--mac", MAC,
               "--listen", f"127.0.0.1:{wol}", "--url", f"http://127.0.0.1:{api}",
               "--token-file", str(token_file(tmp_path))]
    power = {"idle_timeout_s": 1.0, "min_awake_s": 0.0, "check_interval_s": 0.1,
             "suspend_command": suspend, "watch_foreign_gpu_processes": False}
    agent, parts = await start_agent(nursery, agent_config(
        tmp_path, control, {"web": {"command": toy_command(backend), **FAST}}, power, api), rig)
    manager = parts.power.manager
    await until(lambda: manager.machine.state is PowerState.SLEEPING, "asleep")
    async with httpx.AsyncClient(timeout=WAIT_S) as client:  # held, wakes the node
        host, port = running.proxy.route_address()
        assert (await client.get(f"http://{host}:{port}/health")).status_code == 200
    await until(lambda: bool(running.sink.cycles.get("box")), "the cycle reached the proxy")
    [cycle] = running.sink.cycles["box"]
    assert (cycle.outcome, cycle.detail) == ("slept", "slept and resumed")
    names = [name for name, _ in cycle.steps]
    assert names[:4] == ["asking the proxy", "stopping instances", "releasing P-states",
                         "suspend command"]
    assert "resume seen (sleep hook: post)" in names and names[-1] == "web READY"
    assert cycle.idle_to_suspend_s is not None and cycle.suspend_to_resume_s is not None
    assert cycle.resume_to_ready_s is not None
    changes = [(r.instance, r.change) for r in running.sink.instances["box"]]
    assert changes == [("web", "loaded"), ("web", "unloaded"), ("web", "loaded")]
    await until(lambda: len(parts.report.buffer) == 0, "everything sent")
    seqs = running.seqs()
    assert seqs == list(range(1, seqs[-1] + 1))  # across the sleep: none lost, none twice
    assert agent.supervisor.get("web").state is State.READY


ALERT_SCRIPT = """\
import json, sys
alert = json.load(sys.stdin)
with open(sys.argv[1], "a") as out:
    out.write(json.dumps(alert) + "\\n")
"""


def alert_command(folder: Path) -> tuple[list[str], Path]:
    script, log = folder / "alert.py", folder / "alerts.jsonl"
    script.write_text(ALERT_SCRIPT)
    return [sys.executable, str(script), str(log)], log


def alerts_written(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


async def test_a_hot_gpu_a_crash_loop_and_a_failed_suspend_raise_one_alert_each(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    control, rig = free_port(), three_gpu_rig()
    rig.gpus[1].temperature_c = 95
    argv, log = alert_command(tmp_path)
    running = await start_proxy(nursery, edge_config(
        tmp_path, control, free_port(), gpu_temp_c=90, crash_loop_count=3,
        crash_loop_window_s=600, alert_command=argv, alert_repeat_s=3600))
    crasher = {"command": [sys.executable, "-c", "import sys; sys.exit(3)"], "port": free_port(),
               # 4 crashes, then FAILED: the node is idle from then on, and suspends
               "restart": {"backoff_initial_s": 0.05, "backoff_max_s": 0.1,
                           "max_restarts": 3}, "health": {"interval_s": 0.05},
               "stop_timeout_s": 5}
    power = {"idle_timeout_s": 1.0, "min_awake_s": 0.0, "check_interval_s": 0.1,
             "suspend_command": ["sh", "-c", "echo 'Access denied' >&2; exit 1"],
             "failed_suspend_backoff_s": 600.0, "watch_foreign_gpu_processes": False,
             "watch_connections": False}
    await start_agent(nursery, agent_config(tmp_path, control, {"crasher": crasher}, power), rig)
    kinds = {"gpu_temperature", "crash_loop", "suspend_failed"}
    await until(lambda: kinds <= {a["kind"] for a in alerts_written(log)},
                "each alert ran the command")
    sink = running.sink
    # More hot samples and crashes arrive; no alert key goes out twice within repeat_s.
    await until(lambda: len(sink.gpu["box"]) >= 30 and
                sum(r.change == "crashed" for r in sink.instances["box"]) >= 4, "more of both")
    await trio.sleep(0.3)
    written = alerts_written(log)
    keys = [a["key"] for a in written]
    assert sorted(keys) == sorted({f"gpu_temperature:box:{rig.gpus[1].uuid}",
                                   "crash_loop:box:crasher", "suspend_failed:box"})
    by_kind = {a["kind"]: a for a in written}
    assert "95 °C" in by_kind["gpu_temperature"]["message"]
    assert "Access denied" in by_kind["suspend_failed"]["details"]["detail"]
    assert by_kind["crash_loop"]["details"]["crashes"] >= 3
    status = running.proxy.status()
    assert {a["kind"] for a in status["alerts"]} == kinds
    assert status["reports"]["box"]["stored_through"] >= 30
    assert "alert crash_loop: node box: instance crasher crashed" in format_status(status)
    metrics = running.proxy.metrics.registry
    for kind in kinds:
        assert metrics.get_sample_value("edge_alerts_total", {"kind": kind, "node": "box"}) == 1


async def test_a_failed_wake_raises_an_alert(nursery: trio.Nursery, tmp_path: Path) -> None:
    argv, log = alert_command(tmp_path)
    cfg = edge_config(tmp_path, free_port(), free_port(), alert_command=argv)
    text = cfg.read_text().replace("wake_timeout_s = 30", "wake_timeout_s = 1")
    cfg.write_text(text)
    running = await start_proxy(nursery, cfg)
    running.proxy.drivers["box"].wake_now("test: nothing answers")
    await until(lambda: [a["kind"] for a in alerts_written(log)] == ["wake_failed"],
                "the failed wake's alert ran the command")
    assert running.proxy.metrics.registry.get_sample_value(
        "edge_alerts_total", {"kind": "wake_failed", "node": "box"}) == 1


async def test_with_history_on_the_reports_are_rows_of_the_history_database(
        tmp_path: Path) -> None:
    db = tmp_path / "history.sqlite3"
    control, rig = free_port(), three_gpu_rig()
    cfg = edge_config(tmp_path, control, free_port(), history={"enabled": True, "path": str(db)})
    power = {"idle_timeout_s": 1.0, "min_awake_s": 0.0, "check_interval_s": 0.1,
             "suspend_command": ["sh", "-c", "echo 'Access denied' >&2; exit 1"],
             "failed_suspend_backoff_s": 600.0, "watch_foreign_gpu_processes": False}
    async with trio.open_nursery() as nursery:
        running = await start_proxy(nursery, cfg)
        agent, _ = await start_agent(nursery, agent_config(
            tmp_path, control, {"web": {"command": toy_command(free_port()), **FAST}}, power),
            rig)
        sink = running.sink
        await until(lambda: bool(sink.cycles.get("box")) and len(sink.gpu["box"]) >= 6,
                    "a failed suspend and samples reached the proxy")
        agent.request_shutdown()
        await running.stop()  # the recorder writes what it holds as the proxy ends
        nursery.cancel_scope.cancel()
    with query.open_readonly(db) as conn:
        samples = query.gpu_samples(conn, query.Filter(node="box"))
        changes = conn.execute("SELECT instance, change, state FROM instance_changes "
                               "ORDER BY t, id").fetchall()
        cycles = conn.execute("SELECT outcome, detail, steps FROM sleep_cycles").fetchall()
    assert len(samples) >= 6 and {s.gpu_uuid for s in samples} == {g.uuid for g in rig.gpus}
    assert (samples[0].power_w, samples[0].temperature_c, samples[0].memory_used_mib) == \
        (9.5, 30.0, 576.0)
    assert changes[0] == ("web", "loaded", "READY")
    assert ("web", "unloaded", "STOPPED") in changes  # stopped for the suspend that failed
    [(outcome, detail, steps)] = cycles
    assert outcome == "failed" and "Access denied" in detail
    assert "suspend command" in [name for name, _ in json.loads(steps)]
