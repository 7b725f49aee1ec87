"""The README's main job: ``python -m inference_node.demo`` runs the whole stack on localhost
(real edge-proxy and node-agent processes, a real llama-server on a generated tiny model, a
simulated suspend) and, with ``--self-test``, goes through one sleep and one wake by itself."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from edge_proxy.history import query
from shared.tiny_gguf import DEMO_SENTENCE

pytestmark = pytest.mark.llama


def test_the_demo_sleeps_and_a_request_wakes_it(tmp_path: Path, llama_server_bin: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "inference_node.demo", "--self-test", "--port", "0",
         "--idle-timeout-s", "3", "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=240,
        env={"LLAMA_SERVER": str(llama_server_bin), "PATH": "/usr/bin:/bin"})
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    assert "curl -s http://127.0.0.1:" in out  # it tells a person what to type
    assert re.search(r"dashboard   http://127\.0\.0\.1:\d+/  \(the page asks for the token", out)
    assert "the node is asleep" in out and "woke the node and answered" in out
    assert "demo self-test: ok" in out
    # the sentence model gives a readable answer, also after the wake
    assert out.count(f"ms: {DEMO_SENTENCE!r}") == 2
    # the proxy kept the history, written out when it stopped: the wake the request caused
    with query.open_readonly(tmp_path / "history.sqlite3") as conn:
        wakes = query.wakes(conn)
        states = [i.state for i in query.power_intervals(conn)]
        last = query.connections(conn)[0]
    assert wakes and all(w.outcome == "ready" and w.packets >= 1 for w in wakes)
    assert "asleep" in states and states[-1] == "awake"
    assert last.woke and last.held_ms > 0 and last.bytes_down > 0  # the request after sleep
    logs = (tmp_path / "agent.log").read_text()
    assert "suspend command" in logs and "resume seen (sleep hook: post)" in logs
    assert "magic packet for 02:6c:6c:6e:61:70 sent to 127.0.0.1" in (tmp_path / "proxy.log").read_text()
    sleep = (tmp_path / "sleep.log").read_text()  # the simulated sleep heard it and woke
    assert "magic packet for 02:6c:6c:6e:61:70 from 127.0.0.1: waking" in sleep
