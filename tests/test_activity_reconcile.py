"""The /slots check against a real llama-server: drift is corrected, disabled endpoints noted."""

from __future__ import annotations

from pathlib import Path

import httpx
import trio

from inference_node.activity.parser import TaskStarted
from inference_node.activity.reconcile import SlotsReconciler, parse_metrics, processing_slots
from inference_node.activity.tracker import BusyTracker
from tests.support.llama import llama_server

REQUEST_TIMEOUT_S = 60.0
ARGS = ["-c", "512", "-np", "2", "-t", "1"]


def test_processing_slots_reads_only_real_slot_lists() -> None:
    payload = [{"id": 0, "is_processing": True, "id_task": 7},
               {"id": 1, "is_processing": False, "id_task": 3}]
    assert processing_slots(payload) == {0: 7}
    assert processing_slots({"error": "x"}) is None
    assert processing_slots([{"is_processing": True}]) is None
    assert processing_slots([]) == {}


def test_parse_metrics_takes_unlabelled_samples() -> None:
    text = ("# HELP llamacpp:requests_processing Number\n# TYPE x gauge\n"
            "llamacpp:requests_processing 2\nllamacpp:predicted_tokens_seconds 1421.9\nbad line\n")
    assert parse_metrics(text) == {"llamacpp:requests_processing": 2.0,
                                   "llamacpp:predicted_tokens_seconds": 1421.9}


async def test_drift_is_corrected_from_slots_and_metrics_are_read(
        llama_server_bin: Path, tiny_model: Path) -> None:
    tracker = BusyTracker()
    edges: list[bool] = []
    tracker.add_listener(lambda name, busy, t: edges.append(busy))
    async with llama_server(llama_server_bin, tiny_model, [*ARGS, "--metrics"]) as server, \
            httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as client:
        r = await client.post(f"{server.url}/completion",
                              json={"prompt": "hi", "n_predict": 8, "ignore_eos": True})
        r.raise_for_status()
        reconciler = SlotsReconciler(tracker, lambda: {"tiny": server.url})
        # A release line that never arrived: the log thinks slot 1 still works.
        tracker.apply("tiny", TaskStarted(1, 99), trio.current_time())
        corrections = await reconciler.check_all(client)
        assert len(corrections) == 1 and "slot 1 task 99" in corrections[0]
        assert not tracker.busy("tiny") and edges == [True, False]
        assert tracker.instance("tiny").corrections == 1
        record = tracker.instance("tiny")
        speed = record.tokens_per_second
        assert speed is not None and speed > 0 and record.tokens_predicted == 8
        # Agreement: nothing to correct; no new tokens keep the last speed.
        assert await reconciler.check_all(client) == []
        assert record.tokens_per_second == speed
        assert record.requests_processing == 0


async def test_disabled_slots_and_metrics_are_noted_once(
        llama_server_bin: Path, tiny_model: Path) -> None:
    tracker = BusyTracker()
    async with llama_server(llama_server_bin, tiny_model, [*ARGS, "--no-slots"]) as server, \
            httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as client:
        reconciler = SlotsReconciler(tracker, lambda: {"tiny": server.url})
        tracker.apply("tiny", TaskStarted(0, 1), trio.current_time())
        assert await reconciler.check_all(client) == []
        assert await reconciler.check_all(client) == []
        assert tracker.busy("tiny")  # nothing to correct it with: the log stays the truth
        assert tracker.instance("tiny").tokens_per_second is None


async def test_an_unreachable_instance_is_skipped(llama_server_bin: Path) -> None:
    tracker = BusyTracker()
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as client:
        reconciler = SlotsReconciler(tracker, lambda: {"gone": "http://127.0.0.1:9"})
        assert await reconciler.check_all(client) == []
