"""Real parts for models-on-demand tests: config files for a node with two on-demand models
and a proxy in front, a node-agent in this process (hardware fakes only), chat requests and
their checks, the agent's model states and metrics, and a "NIC" in
front of the agent's API that a fake suspend can take down.

On loopback the agent's API would answer while its node "sleeps" (the process runs on);
a proxy whose ``agent_url`` points at a ``Nic`` sees the node go away when the fake suspend
takes the NIC down (connections refused and cut) and come back when the magic packet
arrives, as a sleeping box would.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import httpx
import tomli_w
import trio

from inference_node.agent import Agent, Component, build_parts, run_agent
from inference_node.gpu.inventory import NoGpus
from inference_node.gpu.nvapi import NvapiBackend
from inference_node.ondemand.estimate import instance_need
from inference_node.power.suspend import SuspendAction
from shared.config.loader import Context, build
from shared.config.node import InstanceConfig
from shared.tiny_gguf import TinyModelSpec, write_tiny_model
from tests.support.ports import LOOPBACK, free_port

MAC: Final = "aa:bb:cc:dd:ee:31"
ARGS: Final = ["-c", "512", "-np", "1", "-t", "1", "--no-warmup"]
FAST: Final = {"restart": {"backoff_initial_s": 0.05, "max_restarts": 3},
               "health": {"interval_s": 0.05, "timeout_s": 60}, "stop_timeout_s": 5}
MODELS: Final = ("tiny-a", "tiny-b")
BIG: Final = "tiny-big"


@dataclass
class Node:
    agent_cfg: Path
    proxy_cfg: Path
    ports: dict[str, int]  # model -> its instance's llama-server port
    listens: dict[str, int]  # model -> the proxy's route for it


def write_node(tmp_path: Path, binary: Path, wol_port: int, big: bool = False,
               one_url: bool = False, ttl_s: float | None = None,
               protocol: str = "http", history: Path | None = None,
               tell_proxy: bool = False) -> Node:
    """Two on-demand instances (tiny-a, tiny-b) under a budget that holds one, and a proxy
    with a route to each. ``big``: a third model, tiny-big, larger than the whole budget;
    ``one_url``: every route on one proxy port (routed by ``model``); ``ttl_s`` for every
    instance; ``protocol``: the routes' (``tcp`` routes relay bytes); ``history``: the
    proxy keeps its history in this database; ``tell_proxy``: the agent sends the proxy its
    events (else the proxy learns only from the agent's API)."""
    ports, listens, instances = {}, {}, {}
    shared = free_port()
    specs = {m: TinyModelSpec(n_embd=128, seed=i) for i, m in enumerate(MODELS)}
    if big:
        specs[BIG] = TinyModelSpec(n_embd=512, n_ff=2048, n_layer=8)
    for model, spec in specs.items():
        path = write_tiny_model(tmp_path / f"{model}.gguf", spec)
        ports[model], listens[model] = free_port(), shared if one_url else free_port()
        instances[model.replace("tiny-", "inst-")] = {
            "model": str(path), "binary": str(binary), "port": ports[model], "args": ARGS,
            "load": "on-demand", "models": [model], **FAST,
            **({} if ttl_s is None else {"ttl_s": ttl_s})}
    needs = [sum(instance_need(n, build(InstanceConfig, t, Context(tmp_path / "x.toml"),
                                        f"instances.{n}"), []).values())
             for n, t in instances.items() if n != "inst-big"]
    budget = int(max(needs) + min(needs) / 2)  # room for one of them, not both
    assert budget < sum(needs)
    agent_port, control = free_port(), free_port() if tell_proxy else 0
    agent_cfg = tmp_path / "node-agent.toml"
    agent_cfg.write_text(tomli_w.dumps({
        "agent": {"api_listen": f"{LOOPBACK}:{agent_port}",
                  "state_file": str(tmp_path / "state.toml"), "memory_budget_mib": budget,
                  **({"node": "box"} if tell_proxy else {})},
        "power": {"enabled": False}, "instances": instances,
        **({"proxy": {"url": f"http://{LOOPBACK}:{control}"}} if tell_proxy else {})}))
    text = f"""log_level = "debug"
[control]
listen = "127.0.0.1:{control}"

[nodes.box]
host = "127.0.0.1"
mac = "{MAC}"
wol = {{ broadcast = "127.0.0.1", port = {wol_port} }}
wol_interval_s = 0.5
wake_timeout_s = 60
probe_interval_s = 0.05
probe_timeout_s = 0.5
agent_url = "http://127.0.0.1:{agent_port}"
load_timeout_s = 60
"""
    if history is not None:
        text += f'\n[history]\nenabled = true\npath = "{history}"\n'
    for model in specs:
        text += f"""
[[routes]]
listen = "127.0.0.1:{listens[model]}"
node = "box"
backend_port = {ports[model]}
ready = "http:/health"
protocol = "{protocol}"
"""
        if protocol == "http":
            text += "[routes.http]\nwaking_comment_interval_s = 0.05\n"
    proxy_cfg = tmp_path / "edge.toml"
    proxy_cfg.write_text(text)
    return Node(agent_cfg, proxy_cfg, ports, listens)


def slow_binary(folder: Path, binary: Path, delay_s: float) -> Path:
    """A wrapper that sleeps ``delay_s`` before exec'ing ``binary``: a model that takes
    its time to load."""
    wrapper = folder / "slow-llama-server"
    wrapper.write_text(f'#!/bin/sh\nsleep {delay_s}\nexec "{binary}" "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def _no_library(name: str) -> Any:
    raise OSError(f"{name}: not on this test machine")


@asynccontextmanager
async def agent_running(cfg: Path, suspend: SuspendAction | None = None,
                        kept: list[Component] | None = None) -> AsyncIterator[Agent]:
    """A node-agent from ``cfg`` on a CPU-only box (no NVML, no NVAPI); ``suspend`` replaces
    the suspend command (the hardware boundary); its components go into ``kept``."""
    def components(agent: Agent) -> list[Component]:
        parts = build_parts(agent, inventory=NoGpus("test: CPU only"),
                            backend=NvapiBackend(loader=_no_library), suspend=suspend,
                            watch_system=False).components()
        if kept is not None:
            kept.extend(parts)
        return parts

    async with trio.open_nursery() as nursery:
        agent: Agent = await nursery.start(functools.partial(
            run_agent, cfg, handle_signals=False, make_components=components))
        try:
            yield agent
        finally:
            agent.request_shutdown()


def chat(model: str, stream: bool = False) -> dict[str, Any]:
    return {"model": model, "stream": stream, "max_tokens": 4, "ignore_eos": True,
            "messages": [{"role": "user", "content": "hello"}]}


def answered(response: httpx.Response, model: str) -> None:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == model and body["choices"][0]["finish_reason"] == "length"


async def instance_states(agent: Agent) -> dict[str, str]:
    async with httpx.AsyncClient(base_url=agent.api_urls[0]) as client:
        rows = (await client.get("/v1/models")).json()["models"]
    return {row["model"]: row["state"] for row in rows}


async def agent_metric(agent: Agent, needle: str) -> str:
    async with httpx.AsyncClient(base_url=agent.api_urls[0]) as client:
        text = (await client.get("/metrics")).text
    return "\n".join(line for line in text.splitlines() if needle in line)


class Nic:
    """A TCP relay on ``port`` to ``target`` on loopback, taken down and up as a NIC."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = free_port()
        self._scope: trio.CancelScope | None = None
        self._up = trio.Event()
        self._up.set()

    def down(self) -> None:
        """Close the listener and every relay through it (clients see refusals and resets)."""
        self._up = trio.Event()
        if self._scope is not None:
            self._scope.cancel()

    def up(self) -> None:
        self._up.set()

    async def run(self) -> None:
        """Until cancelled: listen while up."""
        while True:
            await self._up.wait()
            with trio.CancelScope() as self._scope:
                listeners = await trio.open_tcp_listeners(self.port, host=LOOPBACK)
                await trio.serve_listeners(self._relay, listeners)

    async def _relay(self, client: trio.SocketStream) -> None:
        try:
            server = await trio.open_tcp_stream(LOOPBACK, self.target)
        except OSError:
            await client.aclose()
            return
        async with client, server, trio.open_nursery() as nursery:
            nursery.start_soon(_pipe, client, server, nursery.cancel_scope)
            nursery.start_soon(_pipe, server, client, nursery.cancel_scope)


async def _pipe(src: trio.SocketStream, dst: trio.SocketStream, done: trio.CancelScope) -> None:
    try:
        async for chunk in src:
            await dst.send_all(chunk)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    done.cancel()
