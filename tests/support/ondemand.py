"""Real parts for models-on-demand tests: a node-agent in this process (hardware fakes only),
chat requests and their checks, the agent's model states and metrics, and a "NIC" in
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
from pathlib import Path
from typing import Any

import httpx
import trio

from inference_node.agent import Agent, Component, build_parts, run_agent
from inference_node.gpu.inventory import NoGpus
from inference_node.gpu.nvapi import NvapiBackend
from inference_node.power.manager import SuspendAction
from tests.support.ports import LOOPBACK, free_port


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
