"""The busy tracker: events in, busy/idle edges out; fed by a real llama-server's log."""

from __future__ import annotations

from pathlib import Path

import httpx
import trio

from inference_node.activity.parser import AllIdle, ModelLoaded, TaskFinished, TaskStarted
from inference_node.activity.tracker import BusyTracker
from tests.support.llama import LogLines, llama_server

# A loaded 2-core machine may be slow to answer even a tiny model.
REQUEST_TIMEOUT_S = 60.0
SETTLE_TIMEOUT_S = 30.0
SERVER_ARGS = ["-lv", "4", "-c", "512", "-np", "2", "-t", "1"]


async def forward_lines(log: LogLines, instance: str, sink: BusyTracker) -> None:
    """Feed every line the server prints to ``sink`` as the supervisor would, with trio time."""
    seen = 0
    while True:
        await log.wait_for("", count=seen + 1)
        for line in log.lines[seen:]:
            sink.feed(instance, line, trio.current_time())
        seen = len(log.lines)


def edges(tracker: BusyTracker) -> list[tuple[str, bool]]:
    got: list[tuple[str, bool]] = []
    tracker.add_listener(lambda name, busy, t: got.append((name, busy)))
    return got


def test_edges_follow_slots_and_tasks() -> None:
    tracker = BusyTracker()
    seen = edges(tracker)
    tracker.apply("a", TaskStarted(0, 1), 1.0)
    tracker.apply("a", TaskStarted(1, 2), 1.5)  # a second slot: still busy, no new edge
    tracker.apply("a", TaskFinished(0, 1), 2.0)
    assert tracker.busy("a") and seen == [("a", True)]
    tracker.apply("a", TaskFinished(1, 2), 3.0)
    assert not tracker.busy("a") and seen == [("a", True), ("a", False)]
    record = tracker.instance("a")
    assert record.tasks_started == 2 and record.tasks_finished == 2
    assert record.busy_total(10.0) == 2.0


def test_missed_release_is_healed_by_all_idle_and_by_a_fresh_model() -> None:
    tracker = BusyTracker()
    seen = edges(tracker)
    tracker.apply("a", TaskStarted(0, 1), 1.0)
    tracker.apply("a", AllIdle(), 2.0)
    assert not tracker.busy("a")
    tracker.apply("a", TaskStarted(0, 2), 3.0)
    tracker.apply("a", ModelLoaded(), 4.0)  # the child restarted mid-task
    assert not tracker.busy("a")
    assert seen == [("a", True), ("a", False), ("a", True), ("a", False)]


def test_a_release_of_an_unknown_slot_changes_nothing() -> None:
    tracker = BusyTracker()
    seen = edges(tracker)
    tracker.apply("a", TaskFinished(0, 7), 1.0)
    tracker.feed("a", "garbage \x00", 1.0)
    assert seen == [] and tracker.instance("a").tasks_finished == 0


def test_a_broken_listener_does_not_stop_the_others() -> None:
    tracker = BusyTracker()

    def broken(name: str, busy: bool, t: float) -> None:
        raise RuntimeError("listener bug")

    tracker.add_listener(broken)
    seen = edges(tracker)
    tracker.apply("a", TaskStarted(0, 1), 1.0)
    assert seen == [("a", True)]


def test_reset_ends_busy_and_reconcile_respects_newer_log_events() -> None:
    tracker = BusyTracker()
    seen = edges(tracker)
    tracker.apply("a", TaskStarted(0, 1), 1.0)
    stale = tracker.instance("a").seq
    tracker.apply("a", TaskStarted(1, 2), 1.1)
    # /slots answered before the second task's line arrived: the log is newer, keep it.
    assert tracker.reconcile("a", {}, stale, 1.2) is None and tracker.busy("a")
    reason = tracker.reconcile("a", {}, tracker.instance("a").seq, 1.3)
    assert reason is not None and "/slots says no slot processing" in reason
    assert not tracker.busy("a") and tracker.instance("a").corrections == 1
    tracker.apply("a", TaskStarted(0, 3), 2.0)
    tracker.reset("a", 2.5)
    assert seen == [("a", True), ("a", False), ("a", True), ("a", False)]


async def test_real_server_tasks_drive_busy_edges(llama_server_bin: Path, tiny_model: Path) -> None:
    tracker = BusyTracker()
    seen: list[tuple[bool, float]] = []
    tracker.add_listener(lambda name, busy, t: seen.append((busy, t)))
    async with llama_server(llama_server_bin, tiny_model, SERVER_ARGS) as server, \
            trio.open_nursery() as nursery, httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as client:
        nursery.start_soon(forward_lines, server.log, "tiny", tracker)

        async def complete(prompt: str) -> None:
            r = await client.post(f"{server.url}/completion",
                                  json={"prompt": prompt, "n_predict": 24})
            r.raise_for_status()

        async with trio.open_nursery() as requests:
            for prompt in ("one", "two", "three"):
                requests.start_soon(complete, prompt)
        with trio.fail_after(SETTLE_TIMEOUT_S):
            while tracker.instance("tiny").tasks_finished < 3 or tracker.busy("tiny"):
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    record = tracker.instance("tiny")
    assert record.model_loaded and record.tasks_started == 3
    assert [busy for busy, _ in seen] == [True, False] * (len(seen) // 2) and seen
    assert ("kv", "CPU") in record.buffers and ("compute", "CPU") in record.buffers
    assert record.busy_total(trio.current_time()) > 0


def test_counts_stay_right_when_slots_runs_ahead_of_the_log() -> None:
    tracker = BusyTracker()
    seq = tracker.instance("a").seq
    # /slots sees a task whose "processing task" line has not been read yet.
    assert tracker.reconcile("a", {0: 5}, seq, 1.0) is not None and tracker.busy("a")
    tracker.apply("a", TaskStarted(0, 5), 1.1)
    record = tracker.instance("a")
    assert record.tasks_started == 1 and record.active == {0: 5}
    # /slots sees it done before the release line arrives.
    assert tracker.reconcile("a", {}, record.seq, 2.0) is not None
    tracker.apply("a", TaskFinished(0, 5), 2.1)
    assert record.tasks_finished == 1 and not tracker.busy("a")
