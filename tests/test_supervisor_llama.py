"""The supervisor running the real llama-server on a tiny generated model."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Final

import httpx
import pytest
import tomli_w
import trio

from inference_node.agent import Agent, run_agent
from inference_node.supervisor import State, Supervisor
from shared.config.node import InstanceConfig
from tests.support.ports import free_port
from tests.support.supervised import instance, pid_of, process_alive, wait_state

pytestmark = pytest.mark.llama

LLAMA_ARGS: Final = ["-c", "256", "-np", "1", "-t", "1"]
REQUEST_TIMEOUT_S: Final = 60.0


def llama(name: str, binary: Path, model: Path, tmp_path: Path) -> InstanceConfig:
    table = {"binary": str(binary), "model": str(model), "port": free_port(), "args": LLAMA_ARGS}
    return instance(name, table, tmp_path / "instances.toml")


@pytest.fixture
async def sup(nursery: trio.Nursery) -> AsyncIterator[Supervisor]:
    supervisor = Supervisor()
    await nursery.start(supervisor.run)
    yield supervisor


async def complete(port: int) -> str:
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as client:
        response = await client.post(f"http://127.0.0.1:{port}/completion",
                                     json={"prompt": "Hello", "n_predict": 4})
    response.raise_for_status()
    content: str = response.json()["content"]
    return content


async def test_two_llama_servers_ready_serve_and_survive_a_sigkill(
    sup: Supervisor, llama_server_bin: Path, tiny_model: Path, tmp_path: Path
) -> None:
    lines: list[str] = []
    sup.add_line_sink(lambda name, line, t: lines.append(f"{name}: {line}"))
    cfgs = {n: llama(n, llama_server_bin, tiny_model, tmp_path) for n in ("one", "two")}
    await sup.apply(cfgs, {})
    assert await sup.wait_all_ready(REQUEST_TIMEOUT_S)
    for name, cfg in cfgs.items():
        assert isinstance(await complete(cfg.effective_port), str), name
        env = Path(f"/proc/{pid_of(sup, name)}/environ").read_bytes().split(b"\0")
        assert b"CUDA_DEVICE_ORDER=PCI_BUS_ID" in env
    assert any(line.startswith("one: ") for line in lines)
    assert any(line.startswith("two: ") for line in lines)

    killed, other = pid_of(sup, "one"), pid_of(sup, "two")
    os.kill(killed, signal.SIGKILL)
    await wait_state(sup, "one", State.BACKOFF, State.STARTING)
    await wait_state(sup, "one", State.READY)
    assert pid_of(sup, "one") != killed and not process_alive(killed)
    assert pid_of(sup, "two") == other
    assert sup.get("one").restarts == 1 and sup.get("two").restarts == 0
    await complete(cfgs["one"].effective_port)

    await sup.stop_all("test over")
    assert not process_alive(other)


async def test_missing_model_fails_alone(
    sup: Supervisor, llama_server_bin: Path, tiny_model: Path, tmp_path: Path
) -> None:
    good = llama("good", llama_server_bin, tiny_model, tmp_path)
    bad = llama("bad", llama_server_bin, tmp_path / "nope.gguf", tmp_path)
    await sup.apply({"good": good, "bad": bad}, {})
    await wait_state(sup, "bad", State.FAILED)
    assert sup.get("bad").reason == (
        f"instances.bad: model file {tmp_path / 'nope.gguf'} not found; fix the path or download it")
    await wait_state(sup, "good", State.READY)


async def test_bad_flag_crash_loops_into_failed(
    sup: Supervisor, llama_server_bin: Path, tiny_model: Path, tmp_path: Path
) -> None:
    table = {"binary": str(llama_server_bin), "model": str(tiny_model), "port": free_port(),
             "args": [*LLAMA_ARGS, "--no-such-flag"], "restart": {"max_restarts": 2}}
    await sup.apply({"bad": instance("bad", table, tmp_path / "x.toml")}, {})
    await wait_state(sup, "bad", State.FAILED)
    reason = sup.get("bad").reason
    assert "during start-up" in reason and "crashed 3 times" in reason, reason
    assert sup.get("bad").last_error is not None
    assert any("no-such-flag" in line.text for line in sup.logs("bad", 100))


async def test_reload_changes_exactly_the_right_llama_servers(
    nursery: trio.Nursery, llama_server_bin: Path, tiny_model: Path, tmp_path: Path
) -> None:
    def table(port: int, *extra: str) -> dict[str, object]:
        return {"binary": str(llama_server_bin), "model": str(tiny_model), "port": port,
                "args": [*LLAMA_ARGS, *extra]}

    ports = {n: free_port() for n in ("same", "changed", "removed", "added")}
    cfg = tmp_path / "node-agent.toml"

    def write(instances: dict[str, object]) -> None:
        cfg.write_text(tomli_w.dumps({"agent": {"api_listen": "127.0.0.1:0",
                                                "state_file": str(tmp_path / "state.toml")},
                                      "instances": instances}))

    write({n: table(ports[n]) for n in ("same", "changed", "removed")})
    agent: Agent = await nursery.start(run_agent, cfg)
    assert await agent.supervisor.wait_all_ready(REQUEST_TIMEOUT_S)
    before = {n: pid_of(agent.supervisor, n) for n in ("same", "changed", "removed")}
    write({"same": table(ports["same"]), "changed": table(ports["changed"], "-c", "512"),
           "added": table(ports["added"])})
    plan = await agent.reload()
    assert (plan.unchanged, plan.changed, plan.removed, plan.added) == (
        ("same",), ("changed",), ("removed",), ("added",))
    assert await agent.supervisor.wait_all_ready(REQUEST_TIMEOUT_S)
    after = {n: pid_of(agent.supervisor, n) for n in ("same", "changed", "added")}
    assert after["same"] == before["same"]
    assert after["changed"] != before["changed"] and not process_alive(before["changed"])
    assert not process_alive(before["removed"])
    assert "--port" in Path(f"/proc/{after['added']}/cmdline").read_text()
    await complete(ports["changed"])
    await complete(ports["added"])


async def test_the_model_loaded_line_probes_health_at_once(
    sup: Supervisor, llama_server_bin: Path, tiny_model: Path, tmp_path: Path
) -> None:
    """A wake waits on READY: llama-server's end-of-load lines trigger the health probe instead
    of the next interval (here far longer than the test may wait)."""
    table = {"binary": str(llama_server_bin), "model": str(tiny_model), "port": free_port(),
             "args": LLAMA_ARGS, "health": {"interval_s": 60.0}}
    cfg = instance("hinted", table, tmp_path / "instances.toml")
    await sup.apply({"hinted": cfg}, {})
    started = trio.current_time()
    await wait_state(sup, "hinted", State.READY)  # bounded well below interval_s
    assert trio.current_time() - started < 60.0
    assert any("model loaded" in line.text for line in sup.get("hinted").ring.tail(1000))
