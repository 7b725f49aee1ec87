"""A reload that removes a running instance while the on-demand scheduler is between two
steps (its GPU reading runs in a thread) leaves the agent running.

The scheduler read the removed instance's config after that await, from the new config, and
the KeyError ended its task and with it the whole agent. The GPU inventory here is CPU-only
with a reading that can be held at the hardware boundary, which is how the test puts the
reload inside the await."""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any

import httpx
import tomli_w
import trio

from inference_node.agent import Agent, Component, build_parts, run_agent
from inference_node.gpu.inventory import GpuInfo
from inference_node.gpu.nvapi import NvapiBackend
from inference_node.supervisor import State
from tests.support.ports import free_port
from tests.support.supervised import toy_command, wait_state

TIMEOUT_S = 30.0
FAST = {"restart": {"backoff_initial_s": 0.05}, "health": {"interval_s": 0.05},
        "stop_timeout_s": 5}


class HeldReading:
    """No GPUs; once ``armed``, a reading waits until ``release`` (or 10 s)."""

    problem = "test: CPU only"

    def __init__(self) -> None:
        self.armed = False
        self.entered = threading.Event()
        self.released = threading.Event()

    def snapshot(self) -> list[GpuInfo]:
        if self.armed:
            self.entered.set()
            self.released.wait(10)
        return []

    def performance_state(self, uuid: str) -> int | None:
        return None


def write(path: Path, instances: dict[str, Any], evict_wait_s: float) -> None:
    path.write_text(tomli_w.dumps({
        "agent": {"api_listen": "127.0.0.1:0", "state_file": str(path.parent / "state.toml"),
                  "memory_budget_mib": 4096, "evict_wait_s": evict_wait_s},
        "power": {"enabled": False}, "pstate": {"enabled": False}, "instances": instances}))


async def test_a_reload_that_removes_an_instance_mid_decision_leaves_the_agent_running(
        tmp_path: Path) -> None:
    cfg = tmp_path / "node-agent.toml"
    port = free_port()
    removed = {"command": toy_command(port), "port": port, **FAST}
    write(cfg, {"removed": removed}, evict_wait_s=60)
    reading = HeldReading()

    def components(agent: Agent) -> list[Component]:
        return build_parts(agent, inventory=reading, backend=NvapiBackend(loader=_no_library),
                           watch_system=False).components()

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            agent: Agent = await nursery.start(functools.partial(
                run_agent, cfg, handle_signals=False, make_components=components))
            await wait_state(agent.supervisor, "removed", State.READY)
            async with httpx.AsyncClient(base_url=agent.api_urls[0]) as client:
                # a reload that changes nothing the supervisor sees wakes the scheduler,
                # which then reads the GPUs (held) with "removed" still in its config
                reading.armed = True
                write(cfg, {"removed": removed}, evict_wait_s=30)
                assert (await client.post("/v1/reload")).status_code == 200
                await trio.to_thread.run_sync(reading.entered.wait, 10)
                # meanwhile the instance leaves the config
                write(cfg, {}, evict_wait_s=30)
                assert (await client.post("/v1/reload")).status_code == 200
                reading.armed = False
                reading.released.set()
                await trio.sleep(0.3)  # the scheduler's next steps after the held reading
                answer = await client.get("/v1/models")
            assert answer.status_code == 200
            assert answer.json() == {"models": []}
            agent.request_shutdown()


def _no_library(name: str) -> Any:
    raise OSError(f"{name}: not on this test machine")
