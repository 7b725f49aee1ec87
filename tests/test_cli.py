"""Both command lines as a user runs them: real processes, real files, exit codes and one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_config import EDGE_OK, NODE_OK

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "deploy" / "examples"
SERVICES = {"edge-proxy": "edge_proxy", "node-agent": "inference_node"}


def cli(service: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", SERVICES[service], *args],
                          capture_output=True, text=True, timeout=60, cwd=REPO)


@pytest.mark.parametrize("service", SERVICES)
def test_help_explains_and_lists_check_config(service: str) -> None:
    out = cli(service, "--help")
    assert out.returncode == 0
    assert "check-config" in out.stdout
    assert "usage:" in out.stdout


@pytest.mark.parametrize("service", SERVICES)
def test_version(service: str) -> None:
    out = cli(service, "--version")
    assert out.returncode == 0
    assert out.stdout.startswith(service + " ")


@pytest.mark.parametrize(("service", "text"), [("edge-proxy", EDGE_OK), ("node-agent", NODE_OK)])
def test_check_config_accepts_and_rejects_in_one_line(tmp_path: Path, service: str, text: str) -> None:
    good = tmp_path / "good.toml"
    good.write_text(text)
    out = cli(service, "check-config", str(good))
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout

    bad = tmp_path / "bad.toml"
    bad.write_text("surprise = 1\n" + text)
    out = cli(service, "check-config", str(bad))
    assert out.returncode == 3
    lines = out.stderr.strip().splitlines()
    assert lines == [f"{service}: config error: {bad}: surprise: unknown key; allowed here: "
                     + lines[0].split("allowed here: ", 1)[1]]
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(("service", "example"), [
    ("edge-proxy", "edge-proxy.toml"),
    ("node-agent", "node-agent.toml"),
    ("edge-proxy", "single-box/edge-proxy.toml"),
    ("node-agent", "single-box/node-agent.toml"),
])
def test_shipped_examples_pass_check_config(service: str, example: str) -> None:
    path = EXAMPLES / example
    assert path.is_file(), f"{path} is missing"
    out = cli(service, "check-config", str(path))
    assert out.returncode == 0, out.stderr
