"""What the proxy knows a node serves, on disk across restarts (real files)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from edge_proxy.http_routes.knowledge import STATE_FILE, ModelKnowledge
from edge_proxy.http_routes.polls import PollGate

LLAMA_ANSWER = json.dumps({"object": "list", "data": [
    {"id": "qwen", "object": "model", "created": 1, "owned_by": "llamacpp", "meta": {"n_ctx": 8}},
]}).encode()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_the_agent_list_and_the_last_answer_survive_a_restart(tmp_path: Path) -> None:
    clock = Clock()
    known = ModelKnowledge(tmp_path, wall=clock)
    assert known.model_list("box", ()) is None  # knows nothing: the only 503 case
    known.from_agent("box", ["qwen", "llama"])
    known.from_answer("box", LLAMA_ANSWER)
    assert (tmp_path / STATE_FILE).exists()
    assert not [p for p in tmp_path.iterdir() if p.name != STATE_FILE]  # no temp file left

    again = ModelKnowledge(tmp_path, wall=clock)
    listed = again.model_list("box", ["from-config"])
    assert listed is not None and listed["object"] == "list"
    # the answer is newer: its entry as the node sent it, then the agent's, then config
    assert [m["id"] for m in listed["data"]] == ["qwen", "llama", "from-config"]
    assert listed["data"][0]["meta"] == {"n_ctx": 8}
    assert {m["object"] for m in listed["data"]} == {"model"}
    assert listed["data"][1]["owned_by"] == "llamanap"

    # a newer report of the agent is the whole truth: llama was disabled
    again.from_agent("box", ["qwen"])
    assert again.ids("box") == ("qwen",)
    assert ModelKnowledge(tmp_path).ids("box") == ("qwen",)


@pytest.mark.parametrize("text", ["{not json", '{"version": 99}', '{"version": 1, "nodes": 3}',
                                  '{"version": 1, "nodes": {"box": {"agent": [5]}}}'])
def test_a_corrupt_state_file_is_a_warning_and_an_empty_start(
        tmp_path: Path, text: str, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / STATE_FILE).write_text(text)
    with caplog.at_level(logging.WARNING):
        known = ModelKnowledge(tmp_path)
    assert known.ids("box") == ()
    assert any(STATE_FILE in r.getMessage() and "starting without" in r.getMessage()
               for r in caplog.records)
    known.from_agent("box", ["qwen"])  # and it is rewritten whole
    assert ModelKnowledge(tmp_path).ids("box") == ("qwen",)


def test_an_unwritable_state_dir_keeps_the_models_in_memory(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    known = ModelKnowledge(blocker / "state")  # a directory below a file cannot be made
    with caplog.at_level(logging.WARNING):
        known.from_agent("box", ["qwen"])
    assert known.ids("box") == ("qwen",)
    assert "cannot save" in caplog.text


def test_an_awake_node_gets_one_poll_per_path_each_refresh_interval() -> None:
    gate = PollGate()
    assert gate.claim("box", "GET /v1/models", 0.0, 30.0, cached=False)  # nothing cached yet
    assert gate.claim("box", "GET /v1/models", 1.0, 30.0, cached=False)
    assert not gate.claim("box", "GET /v1/models", 2.0, 30.0, cached=True)
    assert gate.claim("box", "GET /health", 2.0, 30.0, cached=True)  # per path
    assert not gate.claim("box", "GET /v1/models", 30.9, 30.0, cached=True)
    assert gate.claim("box", "GET /v1/models", 31.0, 30.0, cached=True)
    assert gate.claim("box", "GET /v1/models", 31.0, 0.0, cached=True)  # 0: every poll


def test_an_agent_that_lists_no_models_is_known_to_serve_none(tmp_path: Path) -> None:
    known = ModelKnowledge(tmp_path)
    known.from_agent("box", [])
    assert known.model_list("box", ()) == {"object": "list", "data": []}
    assert ModelKnowledge(tmp_path).model_list("box", ()) == {"object": "list", "data": []}
