"""The system-sleep hook (deploy/system-sleep/llamanap) and the Wake-on-LAN .link example.

The hook runs for real, with a small script standing in for ``node-agent`` on its PATH.
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HOOK = REPO / "deploy" / "system-sleep" / "llamanap"
LINK = REPO / "deploy" / "examples" / "50-wol.link"
SUBPROCESS_TIMEOUT_S = 60.0  # a bound for a hung child on a loaded machine, not a timing check


def run_hook(tmp_path: Path, agent_script: str | None, *args: str,
             **env: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    calls = tmp_path / "calls"
    if agent_script is not None:
        agent = bin_dir / "node-agent"
        agent.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n{agent_script}\n")
        agent.chmod(0o755)
    path = f"{bin_dir}:{env.pop('PATH_TAIL', '/usr/bin:/bin')}"
    done = subprocess.run([str(HOOK), *args], capture_output=True, text=True,
                          timeout=SUBPROCESS_TIMEOUT_S, env={**os.environ, "PATH": path, **env})
    return done, calls


@pytest.mark.parametrize("phase", ["pre", "post"])
def test_hook_tells_the_agent_each_phase(tmp_path: Path, phase: str) -> None:
    done, calls = run_hook(tmp_path, "exit 0", phase, "suspend")
    assert done.returncode == 0
    assert calls.read_text() == f"hook {phase}\n"


def test_hook_never_fails_or_blocks_sleep(tmp_path: Path) -> None:
    failing, _ = run_hook(tmp_path, "exit 3", "pre", "suspend")
    assert failing.returncode == 0 and "exit 3" in failing.stderr
    hung, calls = run_hook(tmp_path, "exec sleep 600", "post", "suspend", HOOK_TIMEOUT_S="1",
                           HOOK_KILL_AFTER_S="1")
    assert hung.returncode == 0 and "exit 124" in hung.stderr  # coreutils timeout stopped it
    assert calls.read_text().splitlines()[-1] == "hook post"


def test_hook_bounds_the_call_without_coreutils_timeout(tmp_path: Path) -> None:
    """On a PATH without `timeout` the hook's own watchdog stops a hung agent."""
    tools = tmp_path / "tools"
    tools.mkdir()
    for tool in ("sleep",):
        found = shutil.which(tool)
        assert found is not None
        (tools / tool).symlink_to(found)
    hung, calls = run_hook(tmp_path, "exec sleep 600", "pre", "suspend", HOOK_TIMEOUT_S="1",
                           PATH_TAIL=str(tools))
    assert hung.returncode == 0 and "exit 143" in hung.stderr  # SIGTERM from the watchdog
    assert calls.read_text() == "hook pre\n"
    answered, _ = run_hook(tmp_path, "exit 0", "post", "suspend", HOOK_TIMEOUT_S="1",
                           PATH_TAIL=str(tools))
    assert answered.returncode == 0 and answered.stderr == ""


def test_hook_without_the_agent_or_for_other_phases(tmp_path: Path) -> None:
    missing, _ = run_hook(tmp_path, None, "pre", "suspend", NODE_AGENT="node-agent-not-here")
    assert missing.returncode == 0 and "not found" in missing.stderr
    other, calls = run_hook(tmp_path, "exit 0", "check", "suspend")
    assert other.returncode == 0 and not calls.exists()


def test_link_example_turns_on_magic_packet_wake() -> None:
    link = configparser.ConfigParser(strict=True)
    link.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    link.read_string(LINK.read_text())
    assert link["Link"]["WakeOnLan"] == "magic"
    assert link["Match"]["MACAddress"]
    assert "NamePolicy" in link["Link"]
