"""The suspend/resume sequence with real parts: an edge-proxy and a node-agent in this process,
supervising real (toy) servers, talking over loopback HTTP, with real suspend commands.

The "suspend" is a real command: ``node-agent simulate-sleep``, which blocks until the proxy's
magic packet reaches a UDP port on 127.0.0.1 and then reports the resume through the agent's API
(as the system-sleep hook does), or a shell command that records that it ran, or one that fails.
"""

from __future__ import annotations

import functools
import sys
import tomllib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import tomli_w
import trio

from edge_proxy.service import Proxy, serve_proxy
from inference_node.agent import Agent, default_components, run_agent
from inference_node.power.policy import PowerState
from inference_node.power.service import PowerService
from inference_node.supervisor import State
from shared.config.edge import load_edge_config
from tests.support.ports import free_port
from tests.support.supervised import toy_command, wait_state

TOKEN = "power-test-token"
MAC = "02:00:00:00:00:07"
FAST = {"restart": {"backoff_initial_s": 0.05}, "health": {"interval_s": 0.05}, "stop_timeout_s": 5}
WAIT_S = 60.0  # bounds a hang on a loaded machine; never a speed check


@dataclass
class Stack:
    agent: Agent
    proxy: Proxy
    api_url: str
    components: list[Any]

    @property
    def power(self) -> PowerService:
        return next(c for c in self.components if isinstance(c, PowerService))


def write_token(folder: Path) -> Path:
    path = folder / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


def edge_config(folder: Path, backend_port: int, wol_port: int, control_port: int) -> Path:
    path = folder / "edge-proxy.toml"
    path.write_text(tomli_w.dumps({
        "log_level": "debug",
        "control": {"listen": f"127.0.0.1:{control_port}", "token_file": str(write_token(folder))},
        "nodes": {"box": {"host": "127.0.0.1", "mac": MAC,
                          "wol": {"broadcast": "127.0.0.1", "port": wol_port},
                          "wol_interval_s": 0.3, "wake_timeout_s": 30,
                          "probe_interval_s": 0.05, "probe_timeout_s": 0.5}},
        "routes": [{"listen": "127.0.0.1:0", "node": "box", "backend_port": backend_port,
                    "ready": "http:/health"}],
    }))
    return path


def agent_config(folder: Path, backend_port: int, api_port: int, control_port: int,
                 suspend_command: list[str], **power: Any) -> Path:
    path = folder / "node-agent.toml"
    token = write_token(folder)
    path.write_text(tomli_w.dumps({
        "log_level": "debug",
        "agent": {"node": "box", "api_listen": f"127.0.0.1:{api_port}", "token_file": str(token),
                  "state_file": str(folder / "state.toml")},
        "proxy": {"url": f"http://127.0.0.1:{control_port}", "token_file": str(token)},
        "power": {"idle_timeout_s": 1.0, "min_awake_s": 0.0, "check_interval_s": 0.1,
                  "suspend_command": suspend_command, "suspend_command_timeout_s": 120.0,
                  "resume_timeout_s": 120.0, "failed_suspend_backoff_s": 600.0,
                  "watch_foreign_gpu_processes": False, **power},
        "pstate": {"enabled": False},
        "instances": {"web": {"command": toy_command(backend_port), **FAST}},
    }))
    return path


def simulate_sleep(api_port: int, wol_port: int, folder: Path) -> list[str]:
    return [sys.executable, "-m", "inference_node", "simulate-sleep", "--mac", MAC,
            "--listen", f"127.0.0.1:{wol_port}", "--url", f"http://127.0.0.1:{api_port}",
            "--token-file", str(folder / "token")]


async def start_stack(nursery: trio.Nursery, folder: Path,
                      suspend: Callable[[int, int, Path], list[str]], **power: Any) -> Stack:
    backend, api, control, wol = free_port(), free_port(), free_port(), free_port()
    proxy: Proxy = await nursery.start(
        serve_proxy, load_edge_config(edge_config(folder, backend, wol, control)))
    components: list[Any] = []

    def make(agent: Agent) -> list[Any]:  # the agent's own parts, kept to look at
        components.extend(default_components(agent))
        return components

    cfg = agent_config(folder, backend, api, control, suspend(api, wol, folder), **power)
    agent: Agent = await nursery.start(functools.partial(run_agent, cfg, handle_signals=False,
                                                         make_components=make))
    await wait_state(agent.supervisor, "web", State.READY)
    return Stack(agent, proxy, f"http://127.0.0.1:{api}", components)


async def until(condition: Callable[[], bool], what: str) -> None:
    with trio.fail_after(WAIT_S):
        while not condition():
            await trio.sleep(0.02)


def node_state(stack: Stack) -> str:
    return str(stack.proxy.status()["nodes"]["box"]["state"])


async def get_health(address: tuple[str, int]) -> httpx.Response:
    async with httpx.AsyncClient(timeout=WAIT_S) as client:
        return await client.get(f"http://{address[0]}:{address[1]}/health")


@pytest.fixture
async def api() -> AsyncIterator[Callable[[str], httpx.AsyncClient]]:
    clients: list[httpx.AsyncClient] = []

    def make(base: str) -> httpx.AsyncClient:
        client = httpx.AsyncClient(base_url=base, timeout=WAIT_S,
                                   headers={"authorization": f"Bearer {TOKEN}"})
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


async def test_idle_node_sleeps_and_the_first_request_wakes_it(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    stack = await start_stack(nursery, tmp_path, simulate_sleep)
    manager = stack.power.manager
    await until(lambda: manager.machine.state is PowerState.SLEEPING, "asleep")
    assert stack.agent.supervisor.get("web").state is State.STOPPED  # stopped before the sleep
    # The agent said `suspended` as it ran the command: ASLEEP at once, although on loopback
    # the stopped server refuses instead of timing out like a sleeping host.
    assert node_state(stack) == "ASLEEP"
    cycle = manager.history[-1]
    steps = [s for s, _ in cycle.steps]
    assert steps[:4] == ["asking the proxy", "stopping instances", "releasing P-states",
                         "suspend command"]

    response = await get_health(stack.proxy.route_address())  # held, wakes the node, delivered
    assert response.status_code == 200
    await wait_state(stack.agent.supervisor, "web", State.READY)  # the proxy's probe may win
    await until(lambda: manager.history[-1].outcome == "slept and resumed", "resumed")
    steps = [s for s, _ in manager.history[-1].steps]
    assert "resume seen (sleep hook: post)" in steps and "web READY" in steps
    assert manager.history[-1].outcome == "slept and resumed"
    node = stack.proxy.status()["nodes"]["box"]
    assert node["packets_sent"] >= 1 and node["last_wake"]["outcome"] is not None


async def test_a_connection_in_flight_at_the_proxy_vetoes_the_sleep(
        nursery: trio.Nursery, tmp_path: Path) -> None:
    marker = tmp_path / "suspended"
    stack = await start_stack(
        nursery, tmp_path, lambda *_: ["sh", "-c", f"echo slept >> {marker}"],
        watch_connections=False)  # the agent does not see the connection; only the proxy does
    manager = stack.power.manager
    conn = await trio.open_tcp_stream(*stack.proxy.route_address())
    await conn.send_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")  # kept open: in flight
    await until(lambda: any(r.outcome.startswith("vetoed") for r in manager.history), "veto")
    vetoed = next(r for r in manager.history if r.outcome.startswith("vetoed"))
    assert "proxy vetoed" in vetoed.outcome and "in flight: 1" in vetoed.outcome
    assert not marker.exists()  # the suspend command never ran
    assert stack.agent.supervisor.get("web").state is State.READY
    assert manager.machine.state is PowerState.AWAKE
    await conn.aclose()
    await until(lambda: marker.exists(), "slept once the connection closed")
    assert marker.read_text() == "slept\n"


async def test_a_failed_suspend_restarts_instances_and_says_why(
        nursery: trio.Nursery, tmp_path: Path,
        api: Callable[[str], httpx.AsyncClient]) -> None:
    stack = await start_stack(
        nursery, tmp_path, lambda *_: ["sh", "-c", "echo 'Access denied' >&2; exit 1"])
    manager = stack.power.manager
    await until(lambda: manager.machine.state is PowerState.FAILED, "failed")
    await wait_state(stack.agent.supervisor, "web", State.READY)
    power = (await api(stack.api_url).get("/v1/power")).json()
    assert power["state"] == "FAILED"
    assert "exited 1: Access denied" in power["last_error"]
    assert power["history"][-1]["outcome"].startswith("failed:")
    await until(lambda: node_state(stack) == "AWAKE", "the proxy was told it stayed up")
    response = await get_health(stack.proxy.route_address())
    assert response.status_code == 200


async def test_an_inhibit_keeps_the_node_awake_until_removed(
        nursery: trio.Nursery, tmp_path: Path,
        api: Callable[[str], httpx.AsyncClient]) -> None:
    marker = tmp_path / "suspended"
    stack = await start_stack(nursery, tmp_path,
                              lambda *_: ["sh", "-c", f"echo slept >> {marker}"])
    client = api(stack.api_url)
    added = (await client.post("/v1/power/inhibit",
                               json={"reason": "training run", "for_s": 3600})).json()
    bad = await client.post("/v1/power/inhibit", json={"reason": "x", "for_s": -1})
    assert bad.status_code == 400 and "for_s" in bad.json()["error"]["message"]
    await trio.sleep(2.5)  # well past idle_timeout_s = 1
    power = (await client.get("/v1/power")).json()
    assert power["state"] == "AWAKE" and not marker.exists()
    assert any("training run" in r for r in power["keeping_awake"])
    assert power["inhibits"][0]["reason"] == "training run"
    removed = await client.delete(f"/v1/power/inhibit/{added['id']}")
    assert removed.status_code == 200
    await until(lambda: marker.exists(), "slept once the inhibit was removed")
    missing = await client.delete(f"/v1/power/inhibit/{added['id']}")
    assert missing.status_code == 404


async def test_a_reload_applies_new_power_settings(nursery: trio.Nursery, tmp_path: Path) -> None:
    old, new = tmp_path / "old-command-ran", tmp_path / "new-command-ran"
    stack = await start_stack(nursery, tmp_path, lambda *_: ["touch", str(old)],
                              idle_timeout_s=3600.0)
    path = stack.agent.cfg_path
    table = tomllib.loads(path.read_text())
    table["power"] |= {"idle_timeout_s": 1.0, "suspend_command": ["touch", str(new)]}
    path.write_text(tomli_w.dumps(table))
    await stack.agent.reload("test")
    await until(lambda: new.exists(), "the new command ran after the new timeout")
    assert not old.exists()
