"""The node-agent control API over real HTTP on loopback, with the agent running in-process."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import tomli_w
import trio
from prometheus_client.registry import Collector

from inference_node.agent import Agent, Component, run_agent
from inference_node.supervisor import State
from shared.config.node import NodeAgentConfig
from shared.errors import ConfigError
from shared.http import App, Request, Response
from tests.support.ports import free_port
from tests.support.supervised import STATE_TIMEOUT_S, toy_command, wait_state

TOKEN = "test-token-123"
FAST = {"restart": {"backoff_initial_s": 0.05}, "health": {"interval_s": 0.05}, "stop_timeout_s": 5}


def write_config(path: Path, instances: dict[str, Any], **agent: Any) -> Path:
    section = {"api_listen": "127.0.0.1:0", "state_file": str(path.parent / "state.toml"),
               "token": TOKEN, **agent}
    path.write_text(tomli_w.dumps({"agent": section, "instances": instances}))
    return path


@pytest.fixture
async def agent(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Agent]:
    cfg = write_config(tmp_path / "node-agent.toml", {
        "a": {"command": toy_command(free_port()), **FAST},
        "b": {"command": toy_command(free_port()), "enabled": False, **FAST},
    })
    running: Agent = await nursery.start(run_agent, cfg)
    await wait_state(running.supervisor, "a", State.READY)
    yield running


@pytest.fixture
async def api(agent: Agent) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=agent.api_urls[0], timeout=STATE_TIMEOUT_S,
                                 headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        yield client


async def test_missing_and_wrong_tokens_are_rejected(agent: Agent) -> None:
    async with httpx.AsyncClient(base_url=agent.api_urls[0]) as client:
        missing = await client.get("/v1/instances")
        wrong = await client.post("/v1/instances/a/stop",
                                  headers={"Authorization": "Bearer nope"})
        metrics = await client.get("/metrics")
    assert missing.status_code == 401 and wrong.status_code == 401
    assert missing.json()["error"]["source"] == "node-agent"
    assert "missing bearer token" in missing.json()["error"]["message"]
    assert wrong.json()["error"]["message"] == "wrong bearer token"
    assert agent.supervisor.get("a").state is State.READY  # the refused stop did nothing
    assert metrics.status_code == 200  # public for Prometheus; it holds no secrets
    assert 'llamanap_instance_ready{instance="a"} 1.0' in metrics.text


async def test_list_one_and_logs(api: httpx.AsyncClient, agent: Agent) -> None:
    rows = (await api.get("/v1/instances")).json()["instances"]
    by_name = {r["name"]: r for r in rows}
    assert by_name["a"]["state"] == "ready" and by_name["a"]["pid"] == agent.supervisor.get("a").child.pid  # type: ignore[union-attr]
    assert by_name["b"]["state"] == "stopped" and by_name["b"]["enabled"] is False
    assert set(by_name["a"]) >= {"uptime_s", "restarts", "gpus", "port", "last_error"}
    one = (await api.get("/v1/instances/a")).json()
    assert one["name"] == "a"
    logs = (await api.get("/v1/instances/a/logs", params={"lines": 5})).json()["lines"]
    assert any("listening on" in line["text"] for line in logs)
    status = (await api.get("/v1/status")).json()
    assert status["node"] == "gpubox" and len(status["instances"]) == 2


async def test_actions_with_wait(api: httpx.AsyncClient, agent: Agent) -> None:
    old_pid = agent.supervisor.get("a").child.pid  # type: ignore[union-attr]
    restarted = (await api.post("/v1/instances/a/restart", json={"wait": True})).json()
    assert restarted["state"] == "ready" and restarted["pid"] != old_pid
    stopped = (await api.post("/v1/instances/a/stop", json={"wait": True})).json()
    assert stopped["state"] == "stopped" and stopped["timed_out"] is False
    started = (await api.post("/v1/instances/b/enable", json={"wait": True})).json()
    assert started["state"] == "ready" and started["enabled"] is True
    assert "[instances.b]" in (Path(agent.config.agent.state_file)).read_text()


async def test_errors_are_json_with_a_clear_message(api: httpx.AsyncClient, agent: Agent) -> None:
    unknown = await api.post("/v1/instances/zzz/start")
    assert unknown.status_code == 404
    assert unknown.json()["error"]["message"] == "no instance named 'zzz'; known: a, b"
    bad_action = await api.post("/v1/instances/a/explode")
    assert bad_action.status_code == 404 and "use one of start" in bad_action.json()["error"]["message"]
    bad_lines = await api.get("/v1/instances/a/logs", params={"lines": "many"})
    assert bad_lines.status_code == 400
    bad_body = await api.post("/v1/instances/a/start", content=b"{nope")
    assert bad_body.status_code == 400 and "not valid JSON" in bad_body.json()["error"]["message"]


async def test_reload_reports_the_plan_and_config_errors(api: httpx.AsyncClient, agent: Agent) -> None:
    ok = (await api.post("/v1/reload")).json()
    assert ok["ok"] is True and ok["unchanged"] == ["a", "b"]
    agent.cfg_path.write_text(agent.cfg_path.read_text() + "\n[instances.c]\nmodel = 3\n")
    bad = await api.post("/v1/reload")
    assert bad.status_code == 400
    error = bad.json()["error"]
    assert error["type"] == "config_error"
    assert error["message"].startswith("config error, nothing changed: ")
    assert "instances.c.model" in error["message"]
    assert agent.supervisor.names == ["a", "b"]
    status = (await api.get("/v1/status")).json()
    assert status["last_reload"]["ok"] is False
    metrics = (await api.get("/metrics")).text
    assert 'llamanap_agent_reloads_total{result="ok"} 1.0' in metrics
    assert 'llamanap_agent_reloads_total{result="error"} 1.0' in metrics


async def test_refuses_to_listen_beyond_loopback_without_a_token(tmp_path: Path) -> None:
    cfg = tmp_path / "node-agent.toml"
    cfg.write_text(tomli_w.dumps({"agent": {"api_listen": "0.0.0.0:0"}}))
    with pytest.raises(ConfigError, match=r"agent\.token: missing while api_listen is 0\.0\.0\.0:0"):
        await run_agent(cfg)


async def test_logs_after_a_seq_return_only_newer_lines(api: httpx.AsyncClient, agent: Agent) -> None:
    first = (await api.get("/v1/instances/a/logs")).json()["lines"]
    last_seq = first[-1]["seq"]
    port = agent.supervisor.get("a").config.effective_port
    async with httpx.AsyncClient() as plain:
        await plain.get(f"http://127.0.0.1:{port}/marker")
    with trio.fail_after(STATE_TIMEOUT_S):
        while not (newer := (await api.get("/v1/instances/a/logs",
                                           params={"after": last_seq})).json()["lines"]):
            await trio.sleep(0.05)
    assert all(line["seq"] > last_seq for line in newer)
    assert any(line["text"] == "request /marker" for line in newer)


class Recorder:
    """A component as activity tracking or the power manager is: watchers (subscribed by the
    factory, as the agent's root does), a route, a task."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.ready: list[str] = []
        self.running = False
        self.reloads = 0

    def feed(self, name: str, line: str, t: float) -> None:
        self.lines.append(f"{name}: {line}")

    def on_state(self, name: str, old: State, new: State, why: str) -> None:
        if new is State.READY:
            self.ready.append(name)

    def routes(self, app: App) -> None:
        @app.route("GET", "/v1/recorder")
        async def show(req: Request) -> Response:
            return Response.json({"lines": len(self.lines), "ready": self.ready})

    def collectors(self) -> list[Collector]:
        return []

    def on_reload(self, config: NodeAgentConfig) -> None:
        self.reloads += 1

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.running = True
        task_status.started()
        await trio.sleep_forever()


async def test_components_plug_in_watchers_routes_and_tasks(nursery: trio.Nursery, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "node-agent.toml", {"a": {"command": toy_command(free_port()), **FAST}})
    made: list[Recorder] = []

    def components(agent: Agent) -> list[Component]:
        made.append(Recorder())
        agent.supervisor.add_line_sink(made[-1].feed)
        agent.supervisor.add_state_listener(made[-1].on_state)
        return list(made)

    agent: Agent = await nursery.start(functools.partial(run_agent, cfg, make_components=components))
    await wait_state(agent.supervisor, "a", State.READY)
    assert made[0].running
    async with httpx.AsyncClient(base_url=agent.api_urls[0]) as client:
        assert (await client.get("/v1/recorder")).status_code == 401
        shown = (await client.get("/v1/recorder", headers={"Authorization": f"Bearer {TOKEN}"})).json()
    assert shown["ready"] == ["a"] and shown["lines"] >= 1
    await agent.reload("test")
    assert made[0].reloads == 1  # what a component offers, the agent calls
