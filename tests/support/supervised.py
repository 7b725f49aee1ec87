"""Build instance configs for supervisor tests from real TOML tables, and inspect processes."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import trio

from inference_node.supervisor import State, Supervisor
from shared.config.loader import Context, build
from shared.config.node import InstanceConfig
from tests.support import toy_server

TOY_SERVER = Path(toy_server.__file__)
# Generous: the test machine is small and shared; these bound hangs, they are not speed checks.
STATE_TIMEOUT_S = 30.0


def toy_command(port: int, *extra: str) -> list[str]:
    return [sys.executable, str(TOY_SERVER), "--port", str(port), *extra]


def instance(name: str, table: dict[str, Any], source: Path) -> InstanceConfig:
    """An InstanceConfig checked exactly as the loader checks one from a file."""
    fast = {"restart": {"backoff_initial_s": 0.05, "backoff_max_s": 0.2},
            "health": {"interval_s": 0.05, "timeout_s": STATE_TIMEOUT_S}, "stop_timeout_s": 5}
    merged = {**fast, **table}
    for key in ("restart", "health"):
        merged[key] = {**fast[key], **table.get(key, {})}  # type: ignore[dict-item]
    return build(InstanceConfig, merged, Context(source), f"instances.{name}")


async def wait_state(sup: Supervisor, name: str, *states: State) -> None:
    with trio.fail_after(STATE_TIMEOUT_S):
        await sup.get(name).wait_for(frozenset(states))


def pid_of(sup: Supervisor, name: str) -> int:
    child = sup.get(name).child
    assert child is not None, f"{name} has no process"
    return child.pid


def process_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
