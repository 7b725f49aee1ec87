"""Reload by difference, config errors on reload, and enable/disable that survive reloads."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
import tomli_w
import trio

from inference_node.agent import Agent, run_agent
from inference_node.supervisor import State, plan_reload
from shared.errors import ConfigError
from tests.support.ports import free_port
from tests.support.supervised import (
    STATE_TIMEOUT_S,
    instance,
    pid_of,
    process_alive,
    toy_command,
    wait_state,
)

FAST = {"restart": {"backoff_initial_s": 0.05}, "health": {"interval_s": 0.05}, "stop_timeout_s": 5}


def toy(port: int, *extra: str, **table: Any) -> dict[str, Any]:
    return {"command": toy_command(port, *extra), **FAST, **table}


def write_config(path: Path, instances: dict[str, dict[str, Any]]) -> None:
    agent = {"api_listen": "127.0.0.1:0", "state_file": str(path.parent / "state.toml")}
    path.write_text(tomli_w.dumps({"agent": agent, "instances": instances}))


async def ready(agent: Agent, *names: str) -> dict[str, int]:
    for name in names:
        await wait_state(agent.supervisor, name, State.READY)
    return {name: pid_of(agent.supervisor, name) for name in names}


async def test_reload_touches_exactly_what_changed(nursery: trio.Nursery, tmp_path: Path) -> None:
    cfg = tmp_path / "node-agent.toml"
    ports = {n: free_port() for n in ("same", "changed", "removed", "added")}
    base = {n: toy(ports[n]) for n in ("same", "changed", "removed")}
    write_config(cfg, base)
    agent: Agent = await nursery.start(run_agent, cfg)
    before = await ready(agent, "same", "changed", "removed")

    write_config(cfg, {"same": base["same"],
                       "changed": toy(ports["changed"], "--ready-after", "0.1"),
                       "added": toy(ports["added"])})
    os.kill(os.getpid(), signal.SIGHUP)
    with trio.fail_after(STATE_TIMEOUT_S):
        while agent.last_reload is None:
            await trio.sleep(0.02)
    assert agent.last_reload.ok, agent.last_reload.message
    after = await ready(agent, "same", "changed", "added")
    assert after["same"] == before["same"]
    assert after["changed"] != before["changed"]
    assert sorted(agent.supervisor.names) == ["added", "changed", "same"]
    assert not process_alive(before["removed"]) and not process_alive(before["changed"])
    assert agent.supervisor.get("same").transitions == 2  # STOPPED->STARTING->READY, nothing since


async def test_config_error_on_reload_keeps_the_running_set(nursery: trio.Nursery, tmp_path: Path) -> None:
    cfg = tmp_path / "node-agent.toml"
    write_config(cfg, {"a": toy(free_port())})
    agent: Agent = await nursery.start(run_agent, cfg)
    before = await ready(agent, "a")
    cfg.write_text(cfg.read_text() + "\n[instances.b]\nport = 'eighty'\n")
    with pytest.raises(ConfigError) as err:
        await agent.reload()
    assert "instances.b.port" in str(err.value)
    assert agent.last_reload is not None and not agent.last_reload.ok
    assert await ready(agent, "a") == before
    assert agent.supervisor.names == ["a"]


async def test_enable_disable_persist_across_reload_and_restart(tmp_path: Path) -> None:
    cfg = tmp_path / "node-agent.toml"
    write_config(cfg, {"a": toy(free_port()), "b": toy(free_port())})
    async with trio.open_nursery() as nursery:
        agent: Agent = await nursery.start(run_agent, cfg)
        await ready(agent, "a", "b")
        agent.set_enabled("b", False, "test")
        await wait_state(agent.supervisor, "b", State.STOPPED)
        await agent.reload()
        assert agent.supervisor.get("b").state is State.STOPPED
        assert agent.supervisor.get("b").enabled is False
        agent.request_shutdown()
    assert "enabled = false" in (tmp_path / "state.toml").read_text()

    async with trio.open_nursery() as nursery:
        agent = await nursery.start(run_agent, cfg)
        await ready(agent, "a")
        assert agent.supervisor.get("b").state is State.STOPPED
        # Editing `enabled` in the config afterwards wins over the API's older choice.
        write_config(cfg, {"a": toy(free_port()), "b": toy(free_port(), enabled=False)})
        await agent.reload()
        write_config(cfg, {"a": toy(free_port()), "b": toy(free_port(), enabled=True)})
        await agent.reload()
        await ready(agent, "b")
        agent.request_shutdown()


def test_plan_reload_is_pure(tmp_path: Path) -> None:
    src = tmp_path / "x.toml"
    a = instance("a", {"command": ["srv", "--port", "1"]}, src)
    a2 = instance("a", {"command": ["srv", "--port", "2"]}, src)
    b = instance("b", {"command": ["srv", "--port", "3"]}, src)
    plan = plan_reload({"a": (a, True), "b": (b, True)}, {"a": (a2, True), "b": (b, False)})
    assert plan.changed == ("a",) and plan.disabled == ("b",) and not plan.unchanged


async def test_instances_dir_files_come_and_go_on_reload(nursery: trio.Nursery, tmp_path: Path) -> None:
    folder = tmp_path / "instances.d"
    folder.mkdir()
    cfg = tmp_path / "node-agent.toml"
    cfg.write_text(tomli_w.dumps({"agent": {"api_listen": "127.0.0.1:0", "instances_dir": "instances.d",
                                            "state_file": str(tmp_path / "state.toml")}}))
    (folder / "one.toml").write_text(tomli_w.dumps({"instances": {"one": toy(free_port())}}))
    agent: Agent = await nursery.start(run_agent, cfg)
    first = await ready(agent, "one")
    (folder / "two.toml").write_text(tomli_w.dumps({"instances": {"two": toy(free_port())}}))
    plan = await agent.reload()
    assert plan.added == ("two",) and plan.unchanged == ("one",)
    assert await ready(agent, "one") == first
    (folder / "one.toml").unlink()
    plan = await agent.reload()
    assert plan.removed == ("one",) and agent.supervisor.names == ["two"]
    assert not process_alive(first["one"])
