"""A node that sleeps, woken by a request for an on-demand model: on the resume the agent
starts that model first, and the ``always`` instance only once it is READY.

Real parts: an edge proxy and a node-agent in this process, two real llama-servers on tiny
models, real TOML files. The hardware boundary is faked: the suspend takes down a ``Nic``
in front of the agent's API (the proxy reaches the agent only through it) and "resumes"
when the proxy's magic packet arrives: the NIC comes up and the sleep hook says ``post``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import httpx
import pytest
import tomli_w
import trio

from edge_proxy.service import Proxy, serve_proxy
from edge_proxy.wake.machine import State as NodeState
from inference_node.agent import Component
from inference_node.power.policy import PowerState
from inference_node.power.service import PowerService
from inference_node.supervisor import State
from shared.config.edge import load_edge_config
from shared.tiny_gguf import TinyModelSpec, write_tiny_model
from tests.support.edge import PacketListener, expected_packet
from tests.support.edge_http import POLL_S, TEST_TIMEOUT_S, wait_state
from tests.support.ondemand import ARGS, FAST, Nic, agent_running, answered, chat
from tests.support.ports import LOOPBACK, free_port

pytestmark = pytest.mark.llama

MAC: Final = "aa:bb:cc:dd:ee:41"


@dataclass
class NicSuspend:
    """The suspend action: the NIC goes down; the next magic packet brings it up and the
    sleep hook reports the resume to the agent's API (as ``node-agent hook post`` does)."""

    nic: Nic
    packets: PacketListener
    asleep: trio.Event = field(default_factory=trio.Event)
    calls: int = 0

    async def suspend(self) -> None:
        self.calls += 1
        self.nic.down()
        self.asleep.set()

    async def run(self, api_url: str) -> None:
        while True:
            await self.asleep.wait()
            self.asleep = trio.Event()
            seen = len(self.packets.packets)
            while not any(data == expected_packet(MAC) for _, data in self.packets.packets[seen:]):
                await self.packets.arrived.wait()
            self.nic.up()
            async with httpx.AsyncClient() as client:
                await client.post(f"{api_url}/v1/power/hook", json={"phase": "post"})


def write_configs(tmp_path: Path, binary: Path, agent_port: int, nic: Nic, control: int,
                  wol_port: int) -> tuple[Path, Path, dict[str, int]]:
    """The agent's and the proxy's config files, and the proxy's route port per instance."""
    ports = {"inst-always": free_port(), "inst-od": free_port()}
    listens = {name: free_port() for name in ports}
    instances = {}
    for i, name in enumerate(ports):
        model = write_tiny_model(tmp_path / f"{name}.gguf", TinyModelSpec(n_embd=128, seed=i))
        instances[name] = {"model": str(model), "binary": str(binary), "port": ports[name],
                           "args": ARGS, **FAST}
    instances["inst-od"] |= {"load": "on-demand", "models": ["tiny-od"]}
    instances["inst-always"] |= {"models": ["tiny-always"]}
    agent_cfg = tmp_path / "node-agent.toml"
    agent_cfg.write_text(tomli_w.dumps({
        "agent": {"node": "box", "api_listen": f"{LOOPBACK}:{agent_port}",
                  "state_file": str(tmp_path / "state.toml")},
        "proxy": {"url": f"http://{LOOPBACK}:{control}"},
        "power": {"idle_timeout_s": 1.0, "min_awake_s": 0.0, "check_interval_s": 0.1,
                  "resume_timeout_s": 600.0, "watch_foreign_gpu_processes": False},
        "pstate": {"enabled": False},
        "instances": instances}))
    text = f"""log_level = "debug"
[control]
listen = "{LOOPBACK}:{control}"

[nodes.box]
host = "{LOOPBACK}"
mac = "{MAC}"
wol = {{ broadcast = "{LOOPBACK}", port = {wol_port} }}
wol_interval_s = 0.5
wake_timeout_s = 60
probe_interval_s = 0.05
probe_timeout_s = 0.5
asleep_probe_interval_s = 3600
agent_url = "http://{LOOPBACK}:{nic.port}"
load_timeout_s = 60
"""
    for name, port in ports.items():
        text += f"""
[[routes]]
listen = "{LOOPBACK}:{listens[name]}"
node = "box"
backend_port = {port}
ready = "http:/health"
protocol = "http"
"""
    proxy_cfg = tmp_path / "edge.toml"
    proxy_cfg.write_text(text)
    return agent_cfg, proxy_cfg, listens


async def test_a_request_that_wakes_the_node_has_its_model_started_before_the_always_ones(
        tmp_path: Path, llama_server_bin: Path) -> None:
    packets = await PacketListener.open()
    agent_port, control = free_port(), free_port()
    nic = Nic(agent_port)
    fake = NicSuspend(nic, packets)
    agent_cfg, proxy_cfg, listens = write_configs(tmp_path, llama_server_bin, agent_port, nic,
                                            control, packets.port)
    moves: list[tuple[str, State]] = []
    parts: list[Component] = []
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(packets.run)
            nursery.start_soon(nic.run)
            proxy: Proxy = await nursery.start(serve_proxy, load_edge_config(proxy_cfg))
            async with agent_running(agent_cfg, suspend=fake, kept=parts) as agent:
                nursery.start_soon(fake.run, agent.api_urls[0])
                manager = next(p for p in parts if isinstance(p, PowerService)).manager
                while manager.machine.state is not PowerState.SLEEPING:
                    await trio.sleep(POLL_S)  # idle: stopped its instances, "suspended"
                await wait_state(proxy, "box", NodeState.ASLEEP)
                agent.supervisor.add_state_listener(
                    lambda name, old, new, reason: moves.append((name, new)))
                url = f"http://{LOOPBACK}:{listens['inst-od']}"
                async with httpx.AsyncClient(timeout=TEST_TIMEOUT_S) as client:
                    answered(await client.post(f"{url}/v1/chat/completions",
                                               json=chat("tiny-od")), "tiny-od")
                while ("inst-always", State.READY) not in moves:
                    await trio.sleep(POLL_S)
                steps = [s for s, _ in manager.history[-1].steps]
            nursery.cancel_scope.cancel()
    assert fake.calls == 1
    assert proxy.metrics.registry.get_sample_value(
        "edge_wakes_total", {"node": "box", "outcome": "ready"}) == 1.0
    starts = [name for name, state in moves if state is State.STARTING]
    assert starts[0] == "inst-od"  # the model the held request asked for, first
    assert moves.index(("inst-od", State.READY)) < moves.index(("inst-always", State.STARTING))
    assert "started first: inst-od" in steps
    assert steps.index("started first: inst-od") < steps.index("starting instances")
