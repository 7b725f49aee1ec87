"""One HTTP listener in front of two sleeping nodes with a model each: the model field picks
the node, only that node is woken, and the model list is the union, awake or asleep."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio

from edge_proxy.service import Proxy, serve_proxy
from edge_proxy.wake.machine import State
from shared.config.edge import load_edge_config
from tests.support.edge import PacketListener
from tests.support.edge_http import (
    SERVER_ARGS,
    TEST_TIMEOUT_S,
    NodeSpec,
    Waker,
    llama_on_port,
    packets_for,
    wait_state,
    write_http_config,
)
from tests.support.ports import free_port

pytestmark = pytest.mark.llama


def chat(model: str) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


async def test_each_model_wakes_only_its_own_node(
        tmp_path: Path, llama_server_bin: Path, tiny_model: Path) -> None:
    alpha = NodeSpec("alpha-box", "aa:bb:cc:dd:ee:0a", free_port(), ("alpha",))
    beta = NodeSpec("beta-box", "aa:bb:cc:dd:ee:0b", free_port(), ("beta",))
    packets = await PacketListener.open()
    cfg = load_edge_config(write_http_config(tmp_path, [alpha, beta], packets.port))
    wakers = {n.name: Waker(n, llama_server_bin, tiny_model, (*SERVER_ARGS, "--alias", n.models[0]))
              for n in (alpha, beta)}
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(packets.run)
            proxy: Proxy = await nursery.start(serve_proxy, cfg)
            for waker in wakers.values():
                nursery.start_soon(waker.run, packets)
            await wait_state(proxy, "alpha-box", State.ASLEEP)
            await wait_state(proxy, "beta-box", State.ASLEEP)
            async with httpx.AsyncClient(base_url=proxy.http_routes.url("127.0.0.1:0"),
                                         timeout=TEST_TIMEOUT_S) as client:
                asleep = await client.get("/v1/models")
                assert asleep.status_code == 200
                assert [m["id"] for m in asleep.json()["data"]] == ["alpha", "beta"]

                unknown = await client.post("/v1/chat/completions", json=chat("gamma"))
                assert unknown.status_code == 404
                assert unknown.json()["error"]["code"] == "model_not_found"
                assert unknown.json()["error"]["source"] == "edge-proxy"
                assert packets.packets == []

                answer = await client.post("/v1/chat/completions", json=chat("beta"))
                assert answer.status_code == 200, answer.text
                assert answer.json()["model"] == "beta"  # llama-server names its --alias
                assert packets_for(packets, beta.mac) >= 1
                assert packets_for(packets, alpha.mac) == 0
                assert proxy.drivers["alpha-box"].state is State.ASLEEP
                mixed = {m["id"]: m["owned_by"] for m in
                         (await client.get("/v1/models")).json()["data"]}
                assert mixed.keys() == {"alpha", "beta"}
                assert mixed["alpha"] == "llamanap"  # asleep, never seen: from config
                assert mixed["beta"] != "llamanap"  # awake: llama-server's own entry

                answer = await client.post("/v1/chat/completions", json=chat("alpha"))
                assert answer.status_code == 200, answer.text
                assert answer.json()["model"] == "alpha"
                assert packets_for(packets, alpha.mac) >= 1

                awake = (await client.get("/v1/models")).json()["data"]
                assert sorted(m["id"] for m in awake) == ["alpha", "beta"]
                # now the live entries (llama-server's own), not the config placeholders
                assert all(m["owned_by"] != "llamanap" for m in awake)

                metrics = (await client.get(f"{proxy.control_url}/metrics")).text
            wakes = {line.split("{")[1].split("}")[0]: float(line.rsplit(" ", 1)[1])
                     for line in metrics.splitlines() if line.startswith("edge_http_wakes_total{")}
            assert wakes == {  # one wake per node, counted under the model that asked
                'model="beta",node="beta-box",route="127.0.0.1:0"': 1.0,
                'model="alpha",node="alpha-box",route="127.0.0.1:0"': 1.0,
            }, wakes
            assert 'edge_http_unknown_model_total{route="127.0.0.1:0"} 1.0' in metrics
            nursery.cancel_scope.cancel()


async def test_a_model_learned_while_awake_still_routes_once_its_node_sleeps(
        tmp_path: Path, llama_server_bin: Path, tiny_model: Path) -> None:
    # neither route names its models: the proxy learns them from each node's /v1/models
    alpha = NodeSpec("alpha-box", "aa:bb:cc:dd:ee:0a", free_port())
    beta = NodeSpec("beta-box", "aa:bb:cc:dd:ee:0b", free_port())
    packets = await PacketListener.open()
    path = write_http_config(tmp_path, [alpha, beta], packets.port)
    args = (*SERVER_ARGS, "--alias", "learned")
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(packets.run)
            backend = trio.CancelScope()
            backend_gone = trio.Event()

            async def first_life(task_status: trio.TaskStatus[None]) -> None:
                with backend:
                    async with llama_on_port(llama_server_bin, tiny_model, alpha.port, args):
                        task_status.started()
                        await trio.sleep_forever()
                backend_gone.set()  # stopped and reaped

            await nursery.start(first_life)
            proxy: Proxy = await nursery.start(serve_proxy, load_edge_config(path))
            await wait_state(proxy, "alpha-box", State.AWAKE)
            async with httpx.AsyncClient(base_url=proxy.http_routes.url("127.0.0.1:0"),
                                         timeout=TEST_TIMEOUT_S) as client:
                while "learned" not in [m["id"] for m in (await client.get("/v1/models")).json()["data"]]:
                    await trio.sleep(0.05)
                backend.cancel()  # the agent stops llama-server, then says it suspends
                await backend_gone.wait()
                assert proxy.drivers["alpha-box"].suspending().allowed
                await wait_state(proxy, "alpha-box", State.ASLEEP)

                nursery.start_soon(Waker(alpha, llama_server_bin, tiny_model, args).run, packets)
                answer = await client.post("/v1/chat/completions", json=chat("learned"))
                assert answer.status_code == 200, answer.text
                assert answer.json()["model"] == "learned"
                assert packets_for(packets, alpha.mac) >= 1
                assert packets_for(packets, beta.mac) == 0
            nursery.cancel_scope.cancel()


async def test_one_listener_routes_by_model_to_the_port_of_one_node_that_serves_it(
        tmp_path: Path, llama_server_bin: Path, tiny_model: Path) -> None:
    # two llama-servers on one node, one route each on one listen address, no models in
    # config: each port's own /v1/models says what it serves
    chat_port = NodeSpec("box", "aa:bb:cc:dd:ee:0c", free_port())
    coder_port = NodeSpec("box", "aa:bb:cc:dd:ee:0c", free_port())
    packets = await PacketListener.open()
    path = write_http_config(tmp_path, [chat_port], packets.port, routed=[chat_port, coder_port])
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery, \
                llama_on_port(llama_server_bin, tiny_model, chat_port.port,
                              (*SERVER_ARGS, "--alias", "chat")), \
                llama_on_port(llama_server_bin, tiny_model, coder_port.port,
                              (*SERVER_ARGS, "--alias", "coder")):
            nursery.start_soon(packets.run)
            proxy: Proxy = await nursery.start(serve_proxy, load_edge_config(path))
            await wait_state(proxy, "box", State.AWAKE)
            async with httpx.AsyncClient(base_url=proxy.http_routes.url("127.0.0.1:0"),
                                         timeout=TEST_TIMEOUT_S) as client:
                while sorted(m["id"] for m in (await client.get("/v1/models")).json()["data"]) \
                        != ["chat", "coder"]:
                    await trio.sleep(0.05)
                for model in ("chat", "coder", "chat"):
                    answer = await client.post("/v1/chat/completions", json=chat(model))
                    assert answer.status_code == 200, answer.text
                    assert answer.json()["model"] == model
            (route,) = [r for r in proxy.status()["routes"] if r.get("protocol") == "http"]
            assert {key: (n["node"], n["backend_port"], n["models"])
                    for key, n in route["nodes"].items()} == {
                f"box:{chat_port.port}": ("box", chat_port.port, ["chat"]),
                f"box:{coder_port.port}": ("box", coder_port.port, ["coder"])}
            nursery.cancel_scope.cancel()
