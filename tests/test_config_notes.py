"""check-config says what a valid config will do when that may surprise: real CLIs, real files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from shared.config.edge import load_edge_config
from shared.config.node import load_node_config
from shared.config.notes import edge_notes, node_notes

EDGE = """
[control]
listen = "127.0.0.1:9180"

[nodes.gpubox]
host = "10.0.0.5"
mac = "aa:bb:cc:dd:ee:ff"
wol = { broadcast = "10.0.0.255" }

[[routes]]
listen = "127.0.0.1:8080"
node = "gpubox"
backend_port = 8080
"""


def cli(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=60, check=False)


def test_an_empty_agent_file_says_it_will_suspend_this_machine(tmp_path: Path) -> None:
    path = tmp_path / "node-agent.toml"
    path.write_text("")
    out = cli("inference_node", "check-config", str(path))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"{path}: ok (0 instance(s), 0 enabled)"
    notes = lines[1:]
    assert all(line.startswith("note: ") for line in notes)
    assert any("will suspend this machine after 900 s without use" in n for n in notes)
    assert any(n.startswith("note: instances: none defined") for n in notes)
    assert any(n.startswith("note: proxy: not configured") for n in notes)


def test_a_config_that_never_suspends_says_nothing_of_suspending(tmp_path: Path) -> None:
    path = tmp_path / "node-agent.toml"
    path.write_text('[power]\nenabled = false\n[instances.a]\ncommand = "srv --port 8080"\n')
    notes = node_notes(load_node_config(path))
    assert notes == []


def test_a_set_idle_timeout_is_named_without_calling_it_the_default(tmp_path: Path) -> None:
    path = tmp_path / "node-agent.toml"
    path.write_text('[power]\nidle_timeout_s = 60\n[proxy]\nurl = "http://127.0.0.1:9180"\n'
                    '[instances.a]\ncommand = "srv --port 8080"\nenabled = false\n')
    notes = node_notes(load_node_config(path))
    assert notes[0] == ("power: will suspend this machine after 60 s without use "
                        "(power.idle_timeout_s); set power.enabled = false to never suspend")
    assert any(n.startswith("instances: all 1 disabled") for n in notes)
    assert not any(n.startswith("proxy:") for n in notes)


def test_edge_notes_name_unused_nodes_and_the_default_broadcast(tmp_path: Path) -> None:
    path = tmp_path / "edge-proxy.toml"
    path.write_text(EDGE + '\n[nodes.spare]\nhost = "10.0.0.6"\nmac = "aa:bb:cc:dd:ee:01"\n'
                    "max_held = 0\n")
    notes = edge_notes(load_edge_config(path))
    assert "nodes.spare: no route uses it; it is woken only by `edge-proxy wake spare`" in notes
    assert any(n.startswith("nodes.spare.wol.broadcast: not set") for n in notes)
    assert any(n.startswith("nodes.spare.max_held: 0") for n in notes)
    assert not any(n.startswith("nodes.gpubox") for n in notes)


def test_edge_check_config_prints_the_notes(tmp_path: Path) -> None:
    path = tmp_path / "edge-proxy.toml"
    path.write_text(EDGE.replace('listen = "127.0.0.1:8080"', 'listen = "0.0.0.0:8080"'))
    out = cli("edge_proxy", "check-config", str(path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == f"{path}: ok (1 node(s), 1 route(s))"
    assert out.stdout.splitlines()[1].startswith("note: control.listen: 127.0.0.1:9180 (loopback)")
