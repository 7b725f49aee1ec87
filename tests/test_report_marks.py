"""How far each node's reports are stored outlives the proxy: with history on, the intake's
marks are rows of the history database, so a batch re-sent after a real proxy restart (its
reply was lost as the proxy stopped) is known as stored and not written twice."""

from __future__ import annotations

from pathlib import Path

import trio

from edge_proxy.history import query
from edge_proxy.history.records import ReportMark
from edge_proxy.history.store import HistoryRecorder, StoreLimits
from shared.reports import ReportBatch
from tests.fakes.gpu import three_gpu_rig
from tests.support.ports import free_port
from tests.test_report_service import (
    agent_config,
    edge_config,
    restart_proxy,
    start_agent,
    start_proxy,
    until,
)


async def test_a_batch_resent_after_a_proxy_restart_is_stored_once(tmp_path: Path) -> None:
    db = tmp_path / "history.sqlite3"
    control, rig = free_port(), three_gpu_rig()
    cfg = edge_config(tmp_path, control, free_port(), history={"enabled": True, "path": str(db)})
    async with trio.open_nursery() as nursery:
        first = await start_proxy(nursery, cfg)
        agent, parts = await start_agent(nursery, agent_config(tmp_path, control, {}), rig)
        report = parts.report
        await until(lambda: len(first.seqs()) >= 6, "samples reached the first proxy")
        stored = list(first.sink.gpu["box"])[:4]
        await first.stop()
        second = await restart_proxy(nursery, cfg)
        # the restarted proxy starts from the marks the first one kept with its rows
        assert second.proxy.reports.marks["box"].stream == report.stream
        assert second.proxy.reports.marks["box"].stored_through >= stored[-1].seq
        # The reply to these was lost as the first proxy stopped: the agent sends them again.
        assert report.client is not None
        reply = await report.client.send(ReportBatch("box", report.stream, tuple(stored)))
        assert reply.duplicates == len(stored)
        await until(lambda: len(second.seqs()) >= 6 and report.last_error == "",
                    "the agent stores at the second proxy")
        assert not set(second.seqs()) & {r.seq for r in stored}
        agent.request_shutdown()
        await second.stop()
        nursery.cancel_scope.cancel()
    with query.open_readonly(db) as conn:
        samples = query.gpu_samples(conn, query.Filter(node="box"))
        (mark,) = query.report_marks(conn)
    keys = [(s.t, s.gpu_uuid) for s in samples]
    assert len(keys) == len(set(keys))  # across the restart, no sample written twice
    assert mark.node == "box" and mark.stream == report.stream
    assert mark.stored_through == max(second.seqs())  # each batch moves the mark with its rows


def test_the_last_mark_of_a_node_wins_and_marks_are_never_pruned(tmp_path: Path) -> None:
    db = tmp_path / "history.sqlite3"
    recorder = HistoryRecorder(db, StoreLimits(retention_days=0, max_bytes=1 << 30))
    recorder.start()
    for through in (3, 9):
        recorder.record_report_mark(ReportMark("box", "s1", through))
    recorder.record_report_mark(ReportMark("other", "s2", 4))
    recorder.record_report_mark(ReportMark("box", "s3", 2))  # the agent restarted
    recorder.close()  # prunes on the way out: retention 0 deletes every history row
    assert query.stored_marks(db) == [ReportMark("box", "s3", 2), ReportMark("other", "s2", 4)]
    assert query.stored_marks(tmp_path / "none-yet.sqlite3") == []
