"""Cold starts never dead-end a frontend: a restarted proxy still lists what a sleeping node
serves (from its state file) without waking it; a node nobody knows anything about is woken
once to learn; a proxy started before the node sees it come up (the agent's announcement, or
the slow probe of an ASLEEP node). Real proxy, real llama-server, real agent in-process."""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import tomli_w
import trio

from edge_proxy.http_routes.knowledge import STATE_FILE
from edge_proxy.service import Proxy, serve_proxy
from edge_proxy.wake.machine import State
from inference_node.agent import Agent, Component, build_parts, run_agent
from shared.config.edge import load_edge_config
from shared.events import EVENTS_PATH
from tests.support.edge import PacketListener
from tests.support.edge_http import (
    SERVER_ARGS,
    TEST_TIMEOUT_S,
    TOKEN,
    NodeSpec,
    Waker,
    llama_on_port,
    packets_for,
    wait_state,
    write_http_config,
)
from tests.support.llama import child_process
from tests.support.ports import free_port

pytestmark = pytest.mark.llama

ALIAS = "tiny-chat"
ARGS = (*SERVER_ARGS, "--alias", ALIAS)
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def ids(answer: httpx.Response) -> list[str]:
    return [m["id"] for m in answer.json()["data"]]


async def post_event(proxy: Proxy, event: dict[str, Any]) -> None:
    async with httpx.AsyncClient(base_url=proxy.control_url, timeout=TEST_TIMEOUT_S) as ctl:
        reply = await ctl.post(EVENTS_PATH, json=event,
                               headers={"authorization": f"Bearer {TOKEN}"})
    assert reply.status_code == 200, reply.text


async def test_after_a_proxy_restart_a_sleeping_nodes_models_are_listed_without_a_wake(
        tmp_path: Path, llama_server_bin: Path, tiny_model: Path) -> None:
    node = NodeSpec("box", "aa:bb:cc:dd:ee:01", free_port())  # no models in config
    packets = await PacketListener.open()
    path = write_http_config(tmp_path, [node], packets.port,
                             top=f'state_dir = "{tmp_path / "state"}"')
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(packets.run)
            # first life: the node is up, its agent reports its models, a poll is answered
            async with trio.open_nursery() as first:
                proxy: Proxy = await first.start(serve_proxy, load_edge_config(path))
                async with llama_on_port(llama_server_bin, tiny_model, node.port, ARGS):
                    await post_event(proxy, {"event": "ready", "node": "box",
                                             "models": [ALIAS]})
                    await wait_state(proxy, "box", State.AWAKE)
                    async with httpx.AsyncClient(base_url=proxy.http_routes.url("127.0.0.1:0"),
                                                 timeout=TEST_TIMEOUT_S) as client:
                        assert ids(await client.get("/v1/models")) == [ALIAS]
                first.cancel_scope.cancel()  # the proxy restarts while the node sleeps
            assert (tmp_path / "state" / STATE_FILE).exists()

            proxy = await nursery.start(serve_proxy, load_edge_config(path))
            await wait_state(proxy, "box", State.ASLEEP)
            async with httpx.AsyncClient(base_url=proxy.http_routes.url("127.0.0.1:0"),
                                         timeout=TEST_TIMEOUT_S) as client:
                for _ in range(3):  # a frontend that restarted too: it lists, and can choose
                    listed = await client.get("/v1/models")
                    assert listed.status_code == 200, listed.text
                    assert listed.json()["object"] == "list"
                    assert ids(listed) == [ALIAS]
                    assert listed.json()["data"][0]["object"] == "model"
                    assert listed.headers["x-llamanap-cached-from"] == "box"
                assert packets.packets == []
                assert proxy.drivers["box"].state is State.ASLEEP

                waker = Waker(node, llama_server_bin, tiny_model, ARGS)
                nursery.start_soon(waker.run, packets)
                answer = await client.post("/v1/chat/completions", json={"model": ALIAS, **CHAT})
                assert answer.status_code == 200, answer.text
                assert answer.json()["model"] == ALIAS
                assert packets_for(packets, node.mac) >= 1
            nursery.cancel_scope.cancel()


async def test_a_node_nobody_knows_about_is_woken_once_to_learn_its_models(
        tmp_path: Path, llama_server_bin: Path, tiny_model: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    node = NodeSpec("box", "aa:bb:cc:dd:ee:01", free_port())
    packets = await PacketListener.open()
    state = tmp_path / "state"
    state.mkdir()
    (state / STATE_FILE).write_text("{half a file")  # a crash mid-write of some other tool
    path = write_http_config(tmp_path, [node], packets.port, top=f'state_dir = "{state}"')
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(packets.run)
            with caplog.at_level(logging.WARNING):
                proxy: Proxy = await nursery.start(serve_proxy, load_edge_config(path))
            assert "not a model state file" in caplog.text
            await wait_state(proxy, "box", State.ASLEEP)
            nursery.start_soon(Waker(node, llama_server_bin, tiny_model, ARGS).run, packets)
            async with httpx.AsyncClient(base_url=proxy.http_routes.url("127.0.0.1:0"),
                                         timeout=TEST_TIMEOUT_S) as client:
                first = await client.get("/v1/models")
                assert first.status_code == 503, first.text
                assert first.json()["error"]["source"] == "edge-proxy"
                while True:  # the one wake to learn: the waker starts llama-server on its packet
                    listed = await client.get("/v1/models")
                    if listed.status_code == 200:
                        break
                    await trio.sleep(0.05)
                assert ids(listed) == [ALIAS]
            assert proxy.knowledge.ids("box") == (ALIAS,)
            assert packets_for(packets, node.mac) >= 1
            assert "to learn the models" in proxy.drivers["box"].status()["reason"] or \
                proxy.drivers["box"].machine.last_wake is not None
            nursery.cancel_scope.cancel()


async def test_an_asleep_node_that_comes_up_by_hand_is_seen_by_the_slow_probe(
        tmp_path: Path, llama_server_bin: Path, tiny_model: Path) -> None:
    node = NodeSpec("box", "aa:bb:cc:dd:ee:01", free_port(), (ALIAS,))
    packets = await PacketListener.open()
    path = write_http_config(tmp_path, [node], packets.port,
                             node_extra="asleep_probe_interval_s = 0.3")
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(packets.run)
            proxy: Proxy = await nursery.start(serve_proxy, load_edge_config(path))
            await wait_state(proxy, "box", State.ASLEEP)
            async with llama_on_port(llama_server_bin, tiny_model, node.port, ARGS):
                await wait_state(proxy, "box", State.AWAKE)
                assert "seen up while asleep" in proxy.drivers["box"].machine.reason
                assert packets.packets == []
            nursery.cancel_scope.cancel()


def agent_config(folder: Path, proxy: Proxy, port: int, binary: Path, model: Path,
                 **power: Any) -> Path:
    path = folder / "node-agent.toml"
    path.write_text(tomli_w.dumps({
        "agent": {"node": "box", "api_listen": f"127.0.0.1:{free_port()}",
                  "state_file": str(folder / "agent-state.toml")},
        "proxy": {"url": proxy.control_url, "token": TOKEN},
        "power": {"idle_timeout_s": 3600.0, "min_awake_s": 0.0, "check_interval_s": 0.2,
                  "resume_timeout_s": 600.0, "watch_foreign_gpu_processes": False, **power},
        "pstate": {"enabled": False},
        "instances": {ALIAS: {"binary": str(binary), "model": str(model), "port": port,
                              "args": list(SERVER_ARGS)}},
    }))
    return path


class RecordingSuspend:
    """Stands in for `systemctl suspend` (the hardware boundary): records, and returns."""

    def __init__(self) -> None:
        self.calls: list[float] = []
        self.asked = trio.Event()

    async def suspend(self) -> None:
        self.calls.append(trio.current_time())
        self.asked.set()


async def start_agent(nursery: trio.Nursery, path: Path, fake: RecordingSuspend) -> Agent:
    def make(agent: Agent) -> list[Component]:
        return build_parts(agent, suspend=fake, watch_system=False).components()

    agent: Agent = await nursery.start(functools.partial(
        run_agent, path, handle_signals=False, make_components=make))
    return agent


async def test_a_proxy_started_before_the_agent_hears_it_announce_itself(
        tmp_path: Path, llama_server_bin: Path, tiny_model: Path) -> None:
    node = NodeSpec("box", "aa:bb:cc:dd:ee:01", free_port())
    packets = await PacketListener.open()
    # no slow probe: only the agent's announcement can tell the proxy the node is up
    path = write_http_config(tmp_path, [node], packets.port,
                             node_extra="asleep_probe_interval_s = 0")
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(packets.run)
            proxy: Proxy = await nursery.start(serve_proxy, load_edge_config(path))
            await wait_state(proxy, "box", State.ASLEEP)
            agent = await start_agent(nursery, agent_config(tmp_path, proxy, node.port,
                                                            llama_server_bin, tiny_model),
                                      RecordingSuspend())
            await wait_state(proxy, "box", State.AWAKE)
            assert "agent ready" in proxy.drivers["box"].machine.reason
            assert proxy.knowledge.ids("box") == (ALIAS,)  # its events carry them
            async with httpx.AsyncClient(base_url=proxy.http_routes.url("127.0.0.1:0"),
                                         timeout=TEST_TIMEOUT_S) as client:
                answer = await client.post("/v1/chat/completions", json=CHAT)
                assert answer.status_code == 200, answer.text
            assert packets.packets == []
            # an instance disabled: the agent says its new list, and the proxy lists that
            agent.set_enabled(ALIAS, False, "test: no more models here")
            while proxy.knowledge.ids("box") != ():
                await trio.sleep(0.05)
            assert proxy.knowledge.model_list("box", ()) == {"object": "list", "data": []}
            nursery.cancel_scope.cancel()


POLL_INTERVAL_S = 2.0
IDLE_TIMEOUT_S = 3.0


# 0: every poll is relayed and leaves a pooled connection from the proxy to the instance,
# which the agent must not count as use; 30 (the default): most are answered from the cache.
@pytest.mark.parametrize("poll_refresh_s", [0.0, 30.0])
async def test_a_frontend_polling_models_never_keeps_the_node_awake_nor_wakes_it(
        tmp_path: Path, llama_server_bin: Path, tiny_model: Path, poll_refresh_s: float) -> None:
    node = NodeSpec("box", "aa:bb:cc:dd:ee:01", free_port())
    packets = await PacketListener.open()
    path = write_http_config(tmp_path, [node], packets.port,
                             http=f"poll_refresh_s = {poll_refresh_s}")
    record = tmp_path / "suspended"
    polls: list[httpx.Response] = []
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(packets.run)
            proxy: Proxy = await nursery.start(serve_proxy, load_edge_config(path))
            # The agent is a process of its own, as on a real box: the proxy's connections
            # are another process's (in-process they would pass as the agent's own).
            config = agent_config(tmp_path, proxy, node.port, llama_server_bin, tiny_model,
                                  idle_timeout_s=IDLE_TIMEOUT_S,
                                  suspend_command=["sh", "-c", f"date >> {record}"])
            async with child_process([sys.executable, "-m", "inference_node", "run",
                                      "--config", str(config)]) as (agent, log):
                await wait_state(proxy, "box", State.AWAKE)
                async with httpx.AsyncClient(base_url=proxy.http_routes.url("127.0.0.1:0"),
                                             timeout=TEST_TIMEOUT_S) as client:

                    async def poll_forever() -> None:
                        while True:
                            polls.append(await client.get("/v1/models"))
                            await trio.sleep(POLL_INTERVAL_S)

                    nursery.start_soon(poll_forever)
                    while not record.exists():  # the node goes to sleep, polls and all
                        assert agent.returncode is None, log.tail()
                        await trio.sleep(0.05)
                    await wait_state(proxy, "box", State.ASLEEP)
                    asleep_polls = len(polls)
                    while len(polls) < asleep_polls + 3:
                        await trio.sleep(0.05)
                assert "power: suspend command" in log.text()
            assert all(p.status_code == 200 and ids(p) == [ALIAS] for p in polls), \
                [p.text for p in polls]
            assert len(polls) > IDLE_TIMEOUT_S / POLL_INTERVAL_S  # polls ran all along
            assert packets.packets == [] and len(record.read_text().splitlines()) == 1
            assert proxy.drivers["box"].state is State.ASLEEP
            nursery.cancel_scope.cancel()
