"""Models on demand in the running agent, with real llama-servers on tiny models and a memory
budget (a CPU-only box: the budget is the limit) that holds one of them at a time."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import tomli_w
import trio

from inference_node.agent import Agent, Component, Parts, build_parts, run_agent
from inference_node.gpu.inventory import NoGpus
from inference_node.gpu.nvapi import NvapiBackend
from inference_node.ondemand.estimate import instance_need
from inference_node.supervisor import State
from shared.config.loader import Context, build
from shared.config.node import InstanceConfig
from shared.tiny_gguf import TinyModelSpec, write_tiny_model
from tests.support.ports import free_port
from tests.support.supervised import wait_state

pytestmark = pytest.mark.llama

FAST = {"restart": {"backoff_initial_s": 0.05, "max_restarts": 3},
        "health": {"interval_s": 0.05, "timeout_s": 60}, "stop_timeout_s": 5}
ARGS = ["-c", "512", "-np", "1", "-t", "1", "-lv", "4", "--no-warmup"]
# Bounds hangs on a loaded machine; not a speed check.
CALL_TIMEOUT_S = 120.0


def table(model: Path, binary: Path, **extra: Any) -> dict[str, Any]:
    return {"model": str(model), "binary": str(binary), "port": free_port(), "args": ARGS,
            "load": "on-demand", **FAST, **extra}


def need_mib(name: str, tbl: dict[str, Any], source: Path) -> float:
    cfg = build(InstanceConfig, tbl, Context(source), f"instances.{name}")
    return sum(instance_need(name, cfg, []).values())


def write_config(tmp_path: Path, instances: dict[str, dict[str, Any]], budget: float,
                 evict_wait_s: float = 60.0) -> Path:
    path = tmp_path / "node-agent.toml"
    path.write_text(tomli_w.dumps({
        "agent": {"api_listen": "127.0.0.1:0", "state_file": str(tmp_path / "state.toml"),
                  "memory_budget_mib": int(budget), "evict_wait_s": evict_wait_s},
        "power": {"enabled": False}, "instances": instances}))
    return path


@asynccontextmanager
async def running(cfg: Path) -> AsyncIterator[tuple[Agent, httpx.AsyncClient, Parts]]:
    made: list[Parts] = []

    def components(agent: Agent) -> list[Component]:
        made.append(build_parts(agent, inventory=NoGpus("test: CPU only"),
                                backend=NvapiBackend(loader=_no_library), watch_system=False))
        return made[-1].components()

    async with trio.open_nursery() as nursery:
        agent: Agent = await nursery.start(functools.partial(
            run_agent, cfg, handle_signals=False, make_components=components))
        try:
            async with httpx.AsyncClient(base_url=agent.api_urls[0],
                                         timeout=CALL_TIMEOUT_S) as client:
                yield agent, client, made[-1]
        finally:
            agent.request_shutdown()


def _no_library(name: str) -> Any:
    raise OSError(f"{name}: not on this test machine")


@pytest.fixture
def models(tmp_path: Path) -> tuple[Path, Path]:
    a = write_tiny_model(tmp_path / "a.gguf", TinyModelSpec(n_embd=128, n_head=4))
    b = write_tiny_model(tmp_path / "b.gguf", TinyModelSpec(n_embd=128, n_head=4, seed=1))
    return a, b


def one_at_a_time(tmp_path: Path, a: dict[str, Any], b: dict[str, Any],
                  **kw: Any) -> Path:
    sizes = [need_mib("a", a, tmp_path), need_mib("b", b, tmp_path)]
    # room for the larger of the two, not for both
    return write_config(tmp_path, {"a": a, "b": b}, max(sizes) + min(sizes) / 2, **kw)


async def load(client: httpx.AsyncClient, model: str) -> httpx.Response:
    return await client.post(f"/v1/models/{model}/load")


async def test_first_request_loads_and_the_next_model_evicts_it(
        tmp_path: Path, llama_server_bin: Path, models: tuple[Path, Path],
        caplog: pytest.LogCaptureFixture) -> None:
    a = table(models[0], llama_server_bin, models=["alpha", "a"])
    b = table(models[1], llama_server_bin)
    cfg = one_at_a_time(tmp_path, a, b)
    caplog.set_level(logging.INFO)
    async with running(cfg) as (agent, client, _parts):
        sup = agent.supervisor
        listed = {m["model"]: m for m in (await client.get("/v1/models")).json()["models"]}
        assert set(listed) == {"alpha", "a", "b"}
        assert listed["alpha"]["state"] == "unloaded" and listed["alpha"]["instance"] == "a"
        assert listed["b"]["estimated_mib"]["host"] > 0 and listed["b"]["ttl_s"] == 600
        assert sup.get("a").state is State.STOPPED  # on demand: not started with the agent

        r = await load(client, "alpha")
        assert r.status_code == 200, r.text
        assert r.json()["state"] == "loaded" and r.json()["evicted"] == []
        assert sup.get("a").state is State.READY
        # llama-server answers to the instance's model names (--alias alpha,a)
        port = sup.get("a").config.effective_port
        served = (await client.get(f"http://127.0.0.1:{port}/v1/models")).json()
        assert "alpha" in str(served) and "a.gguf" not in str(served["data"][0]["id"])
        again = (await load(client, "a")).json()
        assert again["load_s"] is None  # already loaded: nothing happened

        r = await load(client, "b")
        assert r.status_code == 200, r.text
        assert r.json()["evicted"] == ["a"]
        assert sup.get("a").state is State.STOPPED and sup.get("b").state is State.READY
        listed = {m["model"]: m for m in (await client.get("/v1/models")).json()["models"]}
        assert listed["a"]["state"] == "unloaded" and listed["b"]["state"] == "loaded"
        metrics = (await client.get("/metrics")).text
        assert 'llamanap_ondemand_unloads_total{model="alpha",reason="evicted"} 1.0' in metrics
        assert 'llamanap_ondemand_loads_total{model="b",result="ok"} 1.0' in metrics
        assert 'llamanap_ondemand_load_seconds_count{model="b"} 1.0' in metrics
    evicted = [r.getMessage() for r in caplog.records
               if r.getMessage().startswith("instance a: READY -> STOPPING (evicted for b: ")]
    assert evicted and "MiB free" in evicted[0]


async def test_a_swap_waits_for_the_task_in_progress(
        tmp_path: Path, llama_server_bin: Path, models: tuple[Path, Path]) -> None:
    a = table(models[0], llama_server_bin)
    b = table(models[1], llama_server_bin)
    cfg = one_at_a_time(tmp_path, a, b)
    async with running(cfg) as (agent, client, parts):
        sup = agent.supervisor
        assert (await load(client, "b")).status_code == 200
        events: list[str] = []
        sup.add_state_listener(lambda n, o, new, why: events.append(f"{n} {new.name}"))
        parts.activity.add_listener(lambda n, busy, t: events.append(f"{n} {'busy' if busy else 'idle'}"))
        port = sup.get("b").config.effective_port

        async def long_task() -> None:
            async with httpx.AsyncClient(timeout=CALL_TIMEOUT_S) as llm:
                r = await llm.post(f"http://127.0.0.1:{port}/completion", json={
                    "prompt": "hello", "n_predict": 400, "ignore_eos": True})
                # the whole answer, though the scheduler was waiting to stop this server
                assert r.status_code == 200 and r.json()["tokens_predicted"] == 400

        async with trio.open_nursery() as nursery:
            nursery.start_soon(long_task)
            with trio.fail_after(CALL_TIMEOUT_S):
                while not parts.activity.busy("b"):
                    await trio.sleep(0.01)
            r = await load(client, "a")
        assert r.status_code == 200, r.text
        assert r.json()["evicted"] == ["b"]
        # b was stopped only after its task had ended, and a started after that
        assert events.index("b busy") < events.index("b idle") < events.index("b STOPPING") \
            < events.index("a STARTING")


async def test_idle_model_is_unloaded_after_its_ttl(
        tmp_path: Path, llama_server_bin: Path, models: tuple[Path, Path]) -> None:
    a = table(models[0], llama_server_bin, ttl_s=1)
    cfg = write_config(tmp_path, {"a": a}, 10_000)
    async with running(cfg) as (agent, client, _parts):
        assert (await load(client, "a")).status_code == 200
        listed = (await client.get("/v1/models")).json()["models"][0]
        assert 0 <= listed["ttl_left_s"] <= 1
        await wait_state(agent.supervisor, "a", State.STOPPED)
        assert agent.supervisor.get("a").reason.startswith("idle for ttl 1 s")


async def test_concurrent_requests_for_one_model_load_it_once(
        tmp_path: Path, llama_server_bin: Path, models: tuple[Path, Path]) -> None:
    a = table(models[0], llama_server_bin)
    cfg = write_config(tmp_path, {"a": a}, 10_000)
    async with running(cfg) as (agent, client, _parts):
        starts: list[str] = []
        agent.supervisor.add_state_listener(
            lambda n, o, new, why: starts.append(n) if new is State.STARTING else None)
        codes: list[int] = []

        async def one() -> None:
            codes.append((await load(client, "a")).status_code)

        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(one)
        assert codes == [200] * 20
        assert starts == ["a"]


async def test_a_model_that_fails_to_load_tells_every_caller_and_evicts_nothing_else(
        tmp_path: Path, llama_server_bin: Path, models: tuple[Path, Path]) -> None:
    bad = write_tiny_model(tmp_path / "bad.gguf", TinyModelSpec(n_embd=128, n_head=4))
    data = bytearray(bad.read_bytes())
    at = data.find(b"llama", data.find(b"tokenizer.ggml.model"))
    data[at:at + 5] = b"nosuc"  # a tokenizer llama.cpp does not know: it refuses the file
    bad.write_bytes(bytes(data))
    a = table(models[0], llama_server_bin)
    broken = table(bad, llama_server_bin)
    # room for both: nothing has to go for the broken one
    budget = need_mib("a", a, tmp_path) + need_mib("broken", broken, tmp_path) + 1
    cfg = write_config(tmp_path, {"a": a, "broken": broken}, budget)
    async with running(cfg) as (agent, client, _parts):
        assert (await load(client, "a")).status_code == 200
        answers: list[httpx.Response] = []

        async def one() -> None:
            answers.append(await load(client, "broken"))

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(one)
        assert [r.status_code for r in answers] == [502] * 5
        for r in answers:
            err = r.json()["error"]
            assert err["type"] == "load_failed" and err["source"] == "node-agent"
            assert "model broken (instance broken) failed to load" in err["message"]
        assert agent.supervisor.get("a").state is State.READY
        assert agent.supervisor.get("broken").state in (State.STOPPED, State.FAILED)
        unknown = await load(client, "nope")
        assert unknown.status_code == 404 and "known models: a, broken" in unknown.text


async def test_a_model_bigger_than_the_budget_is_refused_at_once(
        tmp_path: Path, llama_server_bin: Path, models: tuple[Path, Path]) -> None:
    a = table(models[0], llama_server_bin)
    cfg = write_config(tmp_path, {"a": a}, 1)
    async with running(cfg) as (agent, client, _parts):
        r = await load(client, "a")
        assert r.status_code == 409
        assert "more than the whole budget: agent.memory_budget_mib is 1 MiB" in r.text
        assert agent.supervisor.get("a").state is State.STOPPED


async def test_cli_load_status_unload(tmp_path: Path, llama_server_bin: Path,
                                      models: tuple[Path, Path],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    from inference_node.cli import main

    a = table(models[0], llama_server_bin, models=["alpha"])
    b = table(models[1], llama_server_bin)
    cfg = one_at_a_time(tmp_path, a, b)
    async with running(cfg) as (agent, _client, _parts):
        url = ["--url", agent.api_urls[0]]

        async def cli(*argv: str) -> tuple[int, str, str]:
            code = await trio.to_thread.run_sync(main, [*argv, *url])
            out, err = capsys.readouterr()
            return code, out, err

        code, out, _ = await cli("load", "alpha")
        assert code == 0 and out.startswith("alpha: loaded in ") and "instance a" in out
        code, out, _ = await cli("load", "b")
        assert code == 0 and "evicted a" in out
        code, out, _ = await cli("status")
        assert code == 0
        rows = {line.split()[0]: line.split() for line in out.splitlines()
                if line.startswith(("alpha ", "b "))}
        assert rows["alpha"][3] == "UNLOADED" and rows["b"][3] == "LOADED"
        assert rows["b"][-1] in ("599s", "600s")  # b's TTL left, counting from its load
        assert rows["alpha"][-1] == "-"
        code, out, _ = await cli("unload", "b")
        assert code == 0 and out == "b: unloaded (instance b stopped)\n"
        code, _, err = await cli("load", "nope")
        assert code == 1 and "no instance serves model 'nope'" in err


async def test_cli_start_of_an_on_demand_instance_goes_through_the_memory_check(
        tmp_path: Path, llama_server_bin: Path, models: tuple[Path, Path],
        capsys: pytest.CaptureFixture[str]) -> None:
    from inference_node.cli import main

    a = table(models[0], llama_server_bin)
    b = table(models[1], llama_server_bin)
    cfg = one_at_a_time(tmp_path, a, b)
    async with running(cfg) as (agent, client, _parts):
        sup = agent.supervisor

        async def cli(*argv: str) -> tuple[int, str, str]:
            code = await trio.to_thread.run_sync(main, [*argv, "--url", agent.api_urls[0]])
            out, err = capsys.readouterr()
            return code, out, err

        assert (await load(client, "b")).status_code == 200
        code, out, _ = await cli("start", "a", "--wait")
        assert code == 0 and out.startswith("a: start: now READY"), out
        # the budget holds one of them: b, idle, was evicted for a (not both running)
        assert sup.get("b").state is State.STOPPED
        assert sup.get("b").reason.startswith("evicted for a: needs ")
        metrics = (await client.get("/metrics")).text
        assert 'llamanap_ondemand_unloads_total{model="b",reason="evicted"} 1.0' in metrics


async def test_cli_start_of_an_on_demand_instance_too_big_is_refused_with_the_reason(
        tmp_path: Path, llama_server_bin: Path, models: tuple[Path, Path],
        capsys: pytest.CaptureFixture[str]) -> None:
    from inference_node.cli import main

    cfg = write_config(tmp_path, {"a": table(models[0], llama_server_bin)}, 1)
    async with running(cfg) as (agent, _client, _parts):
        code = await trio.to_thread.run_sync(main, ["start", "a", "--url", agent.api_urls[0]])
        _, err = capsys.readouterr()
        assert code == 1
        assert len(err.strip().splitlines()) == 1
        assert "start a: model a needs " in err
        assert "more than the whole budget: agent.memory_budget_mib is 1 MiB" in err
        assert agent.supervisor.get("a").state is State.STOPPED


async def test_a_load_while_the_node_sleeps_waits_for_the_resume_instead_of_failing(
        tmp_path: Path, llama_server_bin: Path, models: tuple[Path, Path]) -> None:
    """After a resume the proxy may ask for a model before the power manager has lifted the
    supervisor's hold (its probe of the agent passed first): the load waits for the hold."""
    cfg = write_config(tmp_path, {"a": table(models[0], llama_server_bin)}, 10_000)
    async with running(cfg) as (agent, client, _parts):
        sup = agent.supervisor
        await sup.stop_all("suspending: node idle")  # as the power manager does
        answers: list[httpx.Response] = []

        async def ask() -> None:
            answers.append(await load(client, "a"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask)
            await trio.sleep(0.5)  # the request is in; nothing may start while held
            assert answers == [] and sup.get("a").state is State.STOPPED
            sup.lift_hold()  # the resume
        assert answers[0].status_code == 200, answers[0].text
        assert sup.get("a").state is State.READY
