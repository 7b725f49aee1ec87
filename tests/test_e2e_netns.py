"""Sleep and wake end to end across two network namespaces: each scenario of
``tests/netns/scenarios.py`` runs as a pytest process inside a fresh "router" namespace, with a
fresh "gpu box" namespace beside it (see tests/support/netns.py).

A whole process, not a thread moved with setns: trio starts worker threads (and spawns
processes from them) as it needs them, and they must all be on the router side, and none of
them may outlive the namespaces into later tests.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.netns import HOSTS_ENV, netns_problem, two_hosts

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parent.parent
SCENARIOS = REPO / "tests" / "netns" / "scenarios.py"
SCENARIO_TIMEOUT_S = 540


def scenario_names() -> list[str]:
    tree = ast.parse(SCENARIOS.read_text())
    return [node.name for node in tree.body
            if isinstance(node, ast.AsyncFunctionDef) and node.name.startswith("test_")]


@pytest.mark.timeout(SCENARIO_TIMEOUT_S + 60)
@pytest.mark.parametrize("scenario", scenario_names())
def test_scenario(scenario: str, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to build network namespaces (CI runs as root)")
    if problem := netns_problem():
        pytest.fail(problem, pytrace=False)
    with two_hosts() as hosts:
        env = {**os.environ, HOSTS_ENV: json.dumps(dataclasses.asdict(hosts))}
        result = subprocess.run(
            ["ip", "netns", "exec", hosts.router, sys.executable, "-m", "pytest",
             f"{SCENARIOS}::{scenario}", "-q", "-p", "no:cacheprovider", "--basetemp",
             str(tmp_path / "inner"), f"--timeout={SCENARIO_TIMEOUT_S}"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=SCENARIO_TIMEOUT_S + 30)
    assert result.returncode == 0, (result.stdout + result.stderr)[-8000:]
    assert "1 passed" in result.stdout, result.stdout[-2000:]
