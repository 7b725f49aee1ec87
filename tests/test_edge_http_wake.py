"""HTTP routes and a sleeping node: polls never wake it, real requests do, held streams hear
about the wake, and a failed wake is an OpenAI-shaped error."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import trio

from edge_proxy.service import Proxy, serve_proxy
from edge_proxy.wake.machine import State
from shared.config.edge import load_edge_config
from shared.events import EVENTS_PATH
from tests.support.edge import PacketListener
from tests.support.edge_http import (
    TEST_TIMEOUT_S,
    TOKEN,
    NodeSpec,
    Waker,
    llama_on_port,
    packets_for,
    sse_payloads,
    wait_state,
    write_http_config,
)
from tests.support.ports import free_port

pytestmark = pytest.mark.llama

POLLS = 100
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


async def agent_event(proxy: Proxy, node: str, event: str) -> bool:
    """Send a node agent's event to the proxy's control endpoint; returns ``allowed``."""
    async with httpx.AsyncClient(base_url=proxy.control_url, timeout=TEST_TIMEOUT_S) as ctl:
        reply = await ctl.post(EVENTS_PATH, json={"event": event, "node": node},
                               headers={"authorization": f"Bearer {TOKEN}"})
    assert reply.status_code == 200, reply.text
    allowed: bool = reply.json()["allowed"]
    return allowed


async def test_polls_come_from_the_cache_and_a_chat_wakes_the_node(
        tmp_path: Path, llama_server_bin: Path, tiny_model: Path) -> None:
    node = NodeSpec("box", "aa:bb:cc:dd:ee:01", free_port())
    packets = await PacketListener.open()
    cfg = load_edge_config(write_http_config(tmp_path, [node], packets.port))
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(packets.run)
            proxy: Proxy = await nursery.start(serve_proxy, cfg)
            url = proxy.http_routes.url("127.0.0.1:0")
            async with httpx.AsyncClient(base_url=url, timeout=TEST_TIMEOUT_S) as client:
                # awake: polls are relayed, and their answers remembered
                async with llama_on_port(llama_server_bin, tiny_model, node.port):
                    await agent_event(proxy, "box", "ready")
                    await wait_state(proxy, "box", State.AWAKE)
                    live_models = await client.get("/v1/models")
                    live_health = await client.get("/health")
                    assert live_models.status_code == live_health.status_code == 200
                    assert "age" not in live_models.headers
                # llama-server is stopped (and reaped); the node's agent says it suspends
                assert await agent_event(proxy, "box", "suspending")
                await wait_state(proxy, "box", State.ASLEEP)

                for _ in range(POLLS):
                    for path, live in (("/v1/models", live_models), ("/health", live_health)):
                        cached = await client.get(path)
                        assert cached.status_code == 200, (path, cached.text)
                        assert cached.content == live.content
                        assert cached.headers["content-type"] == live.headers["content-type"]
                        assert int(cached.headers["age"]) >= 0
                        assert cached.headers["x-llamanap-cached-from"] == "box"
                assert packets.packets == []
                assert proxy.drivers["box"].state is State.ASLEEP

                waker = Waker(node, llama_server_bin, tiny_model)
                nursery.start_soon(waker.run, packets)
                answer = await client.post("/v1/chat/completions", json=CHAT)
                assert answer.status_code == 200, answer.text
                assert answer.json()["choices"][0]["message"]["role"] == "assistant"
                assert packets_for(packets, node.mac) >= 1
                assert len(packets.packets) == packets_for(packets, node.mac)

            metrics = (await httpx.AsyncClient().get(f"{proxy.control_url}/metrics")).text
            assert _sample(metrics, "edge_http_answered_without_wake_total",
                           'node="box",route="127.0.0.1:0",source="cache"') == 2 * POLLS
            assert _sample(metrics, "edge_http_wakes_total",
                           'model="other",node="box",route="127.0.0.1:0"') == 1
            nursery.cancel_scope.cancel()


def _sample(metrics: str, name: str, labels: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + "{"):
            found = ",".join(sorted(line[line.index("{") + 1:line.index("}")].split(",")))
            if found == labels:
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name}{{{labels}}} in:\n{metrics}")


async def test_a_held_stream_gets_comments_then_the_real_stream(
        tmp_path: Path, llama_server_bin: Path, tiny_model: Path) -> None:
    node = NodeSpec("box", "aa:bb:cc:dd:ee:01", free_port())
    packets = await PacketListener.open()
    path = write_http_config(tmp_path, [node], packets.port,
                             http="waking_comment_interval_s = 0.05")
    heard_comment = trio.Event()
    # The backend starts only after the client heard a comment: the order is forced.
    waker = Waker(node, llama_server_bin, tiny_model, gate=heard_comment)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(packets.run)
            proxy: Proxy = await nursery.start(serve_proxy, load_edge_config(path))
            await wait_state(proxy, "box", State.ASLEEP)
            nursery.start_soon(waker.run, packets)
            lines: list[str] = []
            async with (
                httpx.AsyncClient(base_url=proxy.http_routes.url("127.0.0.1:0"),
                                  timeout=TEST_TIMEOUT_S) as client,
                client.stream("POST", "/v1/chat/completions",
                              json={**CHAT, "stream": True}) as response,
            ):
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                async for line in response.aiter_lines():
                    lines.append(line)
                    if line.startswith(": waking box"):
                        heard_comment.set()
            first_data = next(i for i, line in enumerate(lines) if line.startswith("data: "))
            comments = [line for line in lines[:first_data] if line]
            assert comments and all(c.startswith(": waking box ") for c in comments)
            assert not any(line.startswith(":") for line in lines[first_data:])
            payloads = sse_payloads(lines)
            assert payloads[-1] == "[DONE]"
            assert {json.loads(p)["object"] for p in payloads[:-1]} == {"chat.completion.chunk"}
            nursery.cancel_scope.cancel()


async def test_a_wake_that_times_out_is_an_openai_error_from_the_proxy(tmp_path: Path) -> None:
    node = NodeSpec("box", "aa:bb:cc:dd:ee:01", free_port())
    packets = await PacketListener.open()
    path = write_http_config(tmp_path, [node], packets.port,
                             http="waking_comment_interval_s = 0.05")
    # no cooldown: each request below starts its own wake
    path.write_text(path.read_text().replace("wake_timeout_s = 60",
                                             "wake_timeout_s = 1.0\nwake_cooldown_s = 0"))
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(packets.run)
            proxy: Proxy = await nursery.start(serve_proxy, load_edge_config(path))
            await wait_state(proxy, "box", State.ASLEEP)
            async with httpx.AsyncClient(base_url=proxy.http_routes.url("127.0.0.1:0"),
                                         timeout=TEST_TIMEOUT_S) as client:
                plain = await client.post("/v1/chat/completions", json=CHAT)
                assert plain.status_code == 504
                error = plain.json()["error"]
                assert error["source"] == "edge-proxy"
                assert error["type"] == "wake_timeout"
                assert "box" in error["message"]

                streamed = await client.post("/v1/chat/completions",
                                             json={**CHAT, "stream": True})
                assert streamed.status_code == 200  # committed by the first comment
                lines = streamed.text.splitlines()
                assert any(line.startswith(": waking box") for line in lines)
                events = sse_payloads(lines)
                assert len(events) == 1, lines
                assert json.loads(events[0])["error"]["type"] == "wake_timeout"

                # without a cached answer a poll is a 503 that says when to come back
                health = await client.get("/health")
                assert health.status_code == 503
                assert int(health.headers["retry-after"]) > 0
                assert health.json()["error"]["source"] == "edge-proxy"
            assert packets_for(packets, node.mac) >= 2  # one wake per request above
            nursery.cancel_scope.cancel()
