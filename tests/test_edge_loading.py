"""edge_proxy.loading: the agent's model list, one load per (node, model), load failures.

The agent client runs against the real node-agent API on loopback; the loader's single
flight runs with a plain load function on trio's autojump clock (exact virtual times).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from edge_proxy.errors import AgentError, LoadFailed
from edge_proxy.loading import (
    AgentClient,
    AgentModel,
    ModelLoader,
    ModelState,
    NodeModels,
    parse_model_list,
)
from inference_node.agent import Agent, run_agent
from shared.config.edge import NodeConfig
from shared.config.loader import Secret
from tests.support.ports import free_port
from tests.support.supervised import toy_command
from tests.test_api import FAST, TOKEN, write_config

LOAD_S = 3.0


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def node_config(url: str | None, token: str | None = TOKEN) -> NodeConfig:
    return NodeConfig(host="127.0.0.1", mac="aa:bb:cc:dd:ee:ff", agent_url=url,
                      agent_token=Secret(token) if token else None, load_timeout_s=10.0)


# ---- the agent's model list ------------------------------------------------------------------

def test_model_list_is_parsed_with_states_and_the_ports_of_instances() -> None:
    models = (b'{"models": [{"model": "a", "instance": "ia", "state": "loaded"},'
              b' {"model": "a2", "instance": "ia", "state": "loaded"},'
              b' {"model": "b", "instance": "ib", "state": "STOPPING"},'
              b' {"model": "c", "state": "sideways"}]}')
    instances = b'{"instances": [{"name": "ia", "port": 8081}, {"name": "ib", "port": "x"}]}'
    assert parse_model_list(models, instances) == [
        AgentModel("a", ModelState.LOADED, "ia", 8081), AgentModel("a2", ModelState.LOADED,
                                                                   "ia", 8081),
        AgentModel("b", ModelState.STOPPING, "ib"), AgentModel("c", ModelState.UNKNOWN)]
    assert parse_model_list(models)[0] == AgentModel("a", ModelState.LOADED, "ia")


def test_the_models_of_one_port_are_its_instances_and_those_of_no_known_port() -> None:
    table = NodeModels()
    table.update([AgentModel("a", ModelState.LOADED, "ia", 8081),
                  AgentModel("b", ModelState.UNLOADED, "ib", 8082),
                  AgentModel("c", ModelState.UNLOADED, "ic")], now=0.0)
    ids = {port: [m["id"] for m in table.openai_list(port)["data"]] for port in (8081, 8082)}
    assert ids == {8081: ["a", "c"], 8082: ["b", "c"]}
    assert [m["id"] for m in table.openai_list()["data"]] == ["a", "b", "c"]


@pytest.mark.parametrize(("body", "problem"), [
    (b"<html>", "no models list (JSONDecodeError"),
    (b'{"data": []}', "no models list (KeyError"),
    (b'{"models": {}}', "no models list (models is not a list of objects)"),
    (b'{"models": [{"state": "loaded"}]}', "a model row without a model name"),
])
def test_a_malformed_model_list_says_what_is_wrong(body: bytes, problem: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_model_list(body)
    assert str(info.value).startswith(problem)


def test_only_models_the_agent_lists_as_not_loaded_wait_for_a_load() -> None:
    table = NodeModels()
    table.update([AgentModel("a", ModelState.LOADED, "ia", 8081),
                  AgentModel("b", ModelState.UNLOADED, "ib", 8082),
                  AgentModel("c", ModelState.STOPPING, "ic", 8083),
                  AgentModel("d", ModelState.LOADING)], now=5.0)
    assert not table.needs_load("a")
    assert table.needs_load("b") and table.needs_load("c") and table.needs_load("d")
    assert not table.needs_load("unlisted")  # the backend answers for names it knows
    table.loaded("c")
    assert not table.needs_load("c") and table.model_on_port(8083) == "c"
    table.evicted(["ia"])
    assert table.needs_load("a") and table.models["a"].port == 8081
    assert table.model_on_port(9999) is None
    assert [m["id"] for m in table.openai_list()["data"]] == ["a", "b", "c", "d"]
    assert table.seen_at == 5.0


# ---- the client against the real agent API ---------------------------------------------------

@pytest.fixture
async def agent(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Agent]:
    cfg = write_config(tmp_path / "node-agent.toml",
                       {"a": {"command": toy_command(free_port()), **FAST}})
    yield await nursery.start(run_agent, cfg)


async def test_the_agent_lists_its_models_and_names_a_model_it_does_not_know(
        agent: Agent) -> None:
    client = AgentClient("gpubox", node_config(agent.api_urls[0]))
    try:
        listed = await client.models()
        assert [(m.id, m.instance) for m in listed] == [("a", "a")]
        assert listed[0].port == agent.supervisor.get("a").config.effective_port
        with pytest.raises(LoadFailed, match=r"model qwen/7b on node gpubox did not load: the "
                                             r"agent answered 404: .*qwen/7b"):
            await client.load("qwen/7b")
    finally:
        await client.aclose()


async def test_a_wrong_token_is_named_by_the_agent(agent: Agent) -> None:
    client = AgentClient("gpubox", node_config(agent.api_urls[0], token="nope"))
    try:
        with pytest.raises(AgentError, match="answered 401: wrong bearer token"):
            await client.models()
    finally:
        await client.aclose()


async def test_an_unreachable_agent_fails_the_load_with_the_address() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    client = AgentClient("gpubox", node_config(url))
    try:
        with pytest.raises(LoadFailed, match=f"model a on node gpubox did not load: agent at "
                                             f"{url} unreachable: cannot connect: Connection refused"):
            await client.load("a")
    finally:
        await client.aclose()


# ---- one load per (node, model) --------------------------------------------------------------

async def test_concurrent_requests_for_one_model_share_one_load(
        autojump_clock: trio.testing.MockClock) -> None:
    calls: list[tuple[str, str, float]] = []

    async def load(node: str, model: str) -> list[str]:
        calls.append((node, model, trio.current_time()))
        await trio.sleep(LOAD_S)
        return ["other"] if model == "b" else []

    loader = ModelLoader(load, lambda node: 60.0)
    done: list[float] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(loader.run)

        async def request(model: str) -> None:
            evicted = await loader.ensure_loaded("box", model)
            assert evicted == (["other"] if model == "b" else [])
            done.append(trio.current_time())

        start = trio.current_time()
        async with trio.open_nursery() as requests:
            for _ in range(20):
                requests.start_soon(request, "a")
            requests.start_soon(request, "b")
            await trio.sleep(1.0)
            assert loader.loading("box", "a") and "box/a" in repr(loader)
        nursery.cancel_scope.cancel()
    assert sorted((n, m) for n, m, _ in calls) == [("box", "a"), ("box", "b")]
    assert loader.loads == {("box", "a"): 1, ("box", "b"): 1}
    assert done == [start + LOAD_S] * 21
    assert not loader.loading("box", "a")


async def test_a_failed_load_fails_every_waiter_and_the_next_request_tries_again(
        autojump_clock: trio.testing.MockClock) -> None:
    async def load(node: str, model: str) -> list[str]:
        await trio.sleep(LOAD_S)
        raise LoadFailed(model, node, "the agent answered 507: needs 9.1 GiB, budget 8 GiB")

    loader = ModelLoader(load, lambda node: 60.0)
    failures: list[str] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(loader.run)

        async def request() -> None:
            try:
                await loader.ensure_loaded("box", "big")
            except LoadFailed as exc:
                failures.append(str(exc))

        async with trio.open_nursery() as requests:
            for _ in range(5):
                requests.start_soon(request)
        await request()
        nursery.cancel_scope.cancel()
    assert failures == ["model big on node box did not load: the agent answered 507: needs "
                        "9.1 GiB, budget 8 GiB"] * 6
    assert loader.loads == {("box", "big"): 2}


async def test_a_load_past_the_node_timeout_names_the_key(
        autojump_clock: trio.testing.MockClock) -> None:
    async def load(node: str, model: str) -> list[str]:
        await trio.sleep_forever()
        return []

    loader = ModelLoader(load, lambda node: 2.5)
    async with trio.open_nursery() as nursery:
        await nursery.start(loader.run)
        start = trio.current_time()
        with pytest.raises(LoadFailed) as info:
            await loader.ensure_loaded("box", "a")
        assert trio.current_time() == start + 2.5
        nursery.cancel_scope.cancel()
    assert str(info.value) == ("model a on node box did not load: not loaded after 2.5 s "
                               "(nodes.box.load_timeout_s)")


async def test_a_load_cut_by_shutdown_is_a_failure_for_its_waiters() -> None:
    async def load(node: str, model: str) -> list[str]:
        await trio.sleep_forever()
        return []

    loader = ModelLoader(load, lambda node: 60.0)
    seen: list[BaseException] = []
    async with trio.open_nursery() as outer:
        async def request() -> None:
            try:
                await loader.ensure_loaded("box", "a")
            except LoadFailed as exc:
                seen.append(exc)

        async with trio.open_nursery() as owner:
            await owner.start(loader.run)
            outer.start_soon(request)
            await trio.testing.wait_all_tasks_blocked()
            owner.cancel_scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
    assert [str(e) for e in seen] == ["model a on node box did not load: the load was "
                                      "interrupted"]
