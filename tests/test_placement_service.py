"""PlacementService in the running agent: a gpus = "auto" instance of a real llama-server is
placed when it starts, and ``GET /v1/placement`` shows the decision (and a refusal)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import httpx
import pytest
import tomli_w
import trio

from inference_node.agent import Agent, Component, run_agent
from inference_node.gpu.inventory import GpuInfo, NoGpus
from inference_node.placement.service import PlacementService
from inference_node.supervisor import State
from shared.tiny_gguf import TinyModelSpec, write_tiny_model
from tests.support.ports import free_port
from tests.support.supervised import wait_state

pytestmark = pytest.mark.llama

TOKEN = "placement-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FAST = {"restart": {"backoff_initial_s": 0.05, "max_restarts": 0},
        "health": {"interval_s": 0.05, "timeout_s": 60}, "stop_timeout_s": 5}


class TinyGpus:
    """Stand-in for NVML: one 'GPU' far too small for any model."""

    problem = None

    def snapshot(self) -> list[GpuInfo]:
        return [GpuInfo(index=0, uuid="GPU-tiny", pci_bus_id="0000:01:00.0", name="tiny",
                        memory_total_mib=8.0, memory_free_mib=8.0)]

    def performance_state(self, uuid: str) -> int | None:
        return None


def write_config(tmp_path: Path, model: Path, llama_server_bin: Path) -> Path:
    instances: dict[str, Any] = {"a": {"model": str(model), "binary": str(llama_server_bin),
                                       "port": free_port(), "args": ["-c", "1024", "-t", "1", "-lv", "4"],
                                       "gpus": "auto", **FAST}}
    path = tmp_path / "node-agent.toml"
    path.write_text(tomli_w.dumps({
        "agent": {"api_listen": "127.0.0.1:0", "state_file": str(tmp_path / "state.toml"),
                  "token": TOKEN},
        "placement": {"safety_margin_mib": 0}, "instances": instances}))
    return path


def placement_for(agent: Agent, inventory: Any) -> PlacementService:
    """Placement alone, wired to the supervisor as the agent's root does."""
    placement = PlacementService(inventory, agent.config.placement.safety_margin_mib)
    agent.supervisor.add_line_sink(placement.feed)
    agent.supervisor.add_state_listener(placement.on_state)
    agent.supervisor.launch_planner = placement.placer
    return placement


async def start_agent(nursery: trio.Nursery, cfg: Path, inventory: Any) -> Agent:
    def components(agent: Agent) -> list[Component]:
        return [placement_for(agent, inventory)]

    agent: Agent = await nursery.start(functools.partial(run_agent, cfg, handle_signals=False,
                                                         make_components=components))
    return agent


async def test_auto_instance_on_a_cpu_only_box(nursery: trio.Nursery, tmp_path: Path,
                                               llama_server_bin: Path) -> None:
    model = write_tiny_model(tmp_path / "m.gguf", TinyModelSpec())
    agent = await start_agent(nursery, write_config(tmp_path, model, llama_server_bin),
                              NoGpus("no driver"))
    await wait_state(agent.supervisor, "a", State.READY)
    async with httpx.AsyncClient(base_url=agent.api_urls[0], headers=AUTH) as client:
        shown = (await client.get("/v1/placement")).json()
    decision = shown["instances"]["a"]["decision"]
    assert decision["args"] == ["-ngl", "0", "-c", "1024"] and decision["gpus"] == []
    # what llama-server reported, beside the estimate of the host
    measured = shown["instances"]["a"]["measured_mib"]["host"]
    assert measured["kv"] > 0 and abs(measured["total"] - decision["host_mib"]) < 1.0


async def test_refused_instance_fails_with_the_reason(nursery: trio.Nursery, tmp_path: Path,
                                                      llama_server_bin: Path) -> None:
    model = write_tiny_model(tmp_path / "m.gguf", TinyModelSpec(n_layer=4, n_embd=256))
    agent = await start_agent(nursery, write_config(tmp_path, model, llama_server_bin),
                              TinyGpus())
    await wait_state(agent.supervisor, "a", State.FAILED)
    async with httpx.AsyncClient(base_url=agent.api_urls[0], headers=AUTH) as client:
        shown = (await client.get("/v1/placement")).json()
    reason = shown["instances"]["a"]["decision"]["refused"]
    assert reason.startswith("instance a: needs ") and "MiB short" in reason


async def test_reload_updates_the_margin(nursery: trio.Nursery, tmp_path: Path,
                                         llama_server_bin: Path) -> None:
    model = write_tiny_model(tmp_path / "m.gguf", TinyModelSpec())
    cfg = write_config(tmp_path, model, llama_server_bin)
    made: list[PlacementService] = []

    def components(agent: Agent) -> list[Component]:
        made.append(placement_for(agent, NoGpus("no driver")))
        return list(made)

    agent: Agent = await nursery.start(functools.partial(run_agent, cfg, handle_signals=False,
                                                         make_components=components))
    assert made[0].placer.margin_mib == 0
    cfg.write_text(cfg.read_text().replace("safety_margin_mib = 0", "safety_margin_mib = 768"))
    await agent.reload("test")
    assert made[0].placer.margin_mib == 768
