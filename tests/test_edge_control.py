"""The control endpoint over real HTTP: status, metrics, agent events, operator wake, what
is held for a node."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from edge_proxy.service import Proxy, serve_proxy
from edge_proxy.wake.machine import State
from inference_node.errors import ProxyUnreachable
from inference_node.power.proxy_client import ProxyClient
from shared.config.loader import Context, build
from shared.config.node import ProxySection
from shared.events import EVENTS_PATH, HeldWork, NodeEvent, decode_reply
from tests.support.edge import (
    TEST_TIMEOUT_S,
    PacketListener,
    answer_backend,
    expected_packet,
    free_port,
    load_config,
    request,
    response_for,
    serve_backend,
)

TOKEN = {"Authorization": "Bearer s3cret"}  # as in tests.support.edge.write_config


@asynccontextmanager
async def running(tmp_path: Path, *, backend: bool = True,
                  node: dict[str, object] | None = None) -> AsyncIterator[tuple[Proxy, PacketListener, trio.Nursery]]:
    backend_port = free_port()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            packets = await PacketListener.open()
            nursery.start_soon(packets.run)
            if backend:
                await nursery.start(serve_backend, backend_port, answer_backend)
            cfg = load_config(tmp_path, backend_port, packets.port, node=node)
            proxy: Proxy = await nursery.start(serve_proxy, cfg)
            want = State.AWAKE if backend else State.ASLEEP
            while proxy.drivers["box"].state is not want:
                await trio.sleep(0.01)
            yield proxy, packets, nursery
            nursery.cancel_scope.cancel()


async def post(proxy: Proxy, body: bytes | dict[str, Any] | list[int], headers: dict[str, str] | None = None,
               path: str = EVENTS_PATH) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with httpx.AsyncClient() as client:
        return await client.post(proxy.control_url + path, content=content,
                                 headers=TOKEN if headers is None else headers)


async def test_status_needs_the_token_and_metrics_do_not(tmp_path: Path) -> None:
    async with running(tmp_path) as (proxy, _, _), httpx.AsyncClient() as client:
        denied = await client.get(proxy.control_url + "/status")
        assert denied.status_code == 401
        assert denied.json()["error"]["source"] == "edge-proxy"
        status = (await client.get(proxy.control_url + "/status", headers=TOKEN)).json()
        box = status["nodes"]["box"]
        assert box["state"] == "AWAKE" and box["held"] == 0 and box["active"] == 0
        assert box["time_in_state_s"] >= 0
        assert status["routes"][0]["node"] == "box"
        metrics = await client.get(proxy.control_url + "/metrics")
        assert metrics.status_code == 200
        assert 'edge_node_state{node="box",state="AWAKE"} 1.0' in metrics.text


async def test_bad_events_are_rejected_without_effect(tmp_path: Path) -> None:
    async with running(tmp_path) as (proxy, _, _):
        machine = proxy.drivers["box"].machine
        before = (machine.state, machine.generation)
        good = {"event": "suspending", "node": "box"}
        cases: list[tuple[bytes | dict[str, Any] | list[int], dict[str, str] | None, int]] = [
            (good, {"Authorization": "Bearer wrong"}, 401),
            (good, {}, 401),
            ({"event": "suspending", "node": "nosuchbox"}, None, 404),
            (b"{not json", None, 400),
            ({"event": "hibernating", "node": "box"}, None, 400),
            ({"event": "ready", "node": "box", "extra": 1}, None, 400),
            ([1, 2], None, 400),
        ]
        for body, headers, status in cases:
            response = await post(proxy, body, headers)
            assert response.status_code == status, (body, response.text)
            assert response.json()["error"]["message"]
        assert (machine.state, machine.generation) == before


async def test_suspending_is_vetoed_while_relaying_then_drains_and_ready_releases(
        tmp_path: Path) -> None:
    async with running(tmp_path) as (proxy, _, nursery):
        driver = proxy.drivers["box"]
        port = proxy.route_address()[1]
        open_relay = await trio.open_tcp_stream("127.0.0.1", port)
        while driver.active != 1:
            await trio.sleep(0.01)
        reply = decode_reply((await post(proxy, NodeEvent("suspending", "box").__dict__)).content)
        assert not reply.allowed and reply.in_flight == 1 and reply.state == "AWAKE"
        await open_relay.aclose()
        while driver.active:
            await trio.sleep(0.01)
        reply = decode_reply((await post(proxy, {"event": "suspending", "node": "box",
                                                 "reason": "idle 900 s"})).content)
        assert reply.allowed and reply.in_flight == 0 and reply.state == "DRAINING"
        answers: list[bytes] = []

        async def client() -> None:
            answers.append(await request(port, b"while draining\n"))

        nursery.start_soon(client)
        while driver.held != 1:
            await trio.sleep(0.01)
        await trio.sleep(0.2)  # probes see the backend up, but DRAINING keeps the client held
        assert driver.held == 1 and not answers
        reply = decode_reply((await post(proxy, {"event": "ready", "node": "box"})).content)
        assert reply.allowed and reply.state == "AWAKE"
        while not answers:
            await trio.sleep(0.01)
        assert answers == [response_for(b"while draining\n")]


async def test_resumed_makes_a_sleeping_node_waking_and_probes_finish_it(tmp_path: Path) -> None:
    async with running(tmp_path, backend=False) as (proxy, _, nursery):
        driver = proxy.drivers["box"]
        reply = decode_reply((await post(proxy, {"event": "resumed", "node": "box"})).content)
        assert reply.state == "WAKING"
        backend_port = proxy.cfg.routes[0].backend_port
        await nursery.start(serve_backend, backend_port, answer_backend)
        while driver.state is not State.AWAKE:
            await trio.sleep(0.01)


async def test_wake_endpoint_sends_a_packet_now(tmp_path: Path) -> None:
    async with running(tmp_path, backend=False) as (proxy, packets, _):
        response = await post(proxy, b"", path="/v1/nodes/box/wake")
        assert response.status_code == 200 and response.json()["state"] == "WAKING"
        await packets.wait_for(1)
        assert packets.packets[0][1] == expected_packet()
        assert (await post(proxy, b"", path="/v1/nodes/other/wake")).status_code == 404


async def test_agreed_suspend_then_sleep_then_a_client_wakes_the_node(tmp_path: Path) -> None:
    """The agent's whole cycle: suspending (agreed) → the host goes silent → a client arrives
    and is held → the proxy sees the host asleep and wakes it → the client is served."""
    backend_port = free_port()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            packets = await PacketListener.open()
            nursery.start_soon(packets.run)
            backend_scope = trio.CancelScope()
            backend_stopped = trio.Event()

            async def backend(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                              ) -> None:
                with backend_scope:
                    await serve_backend(backend_port, answer_backend,
                                        task_status=task_status)  # type: ignore[arg-type]
                backend_stopped.set()

            await nursery.start(backend)
            cfg = load_config(tmp_path, backend_port, packets.port,
                              node={"probe_timeout_s": 0.3})
            proxy: Proxy = await nursery.start(serve_proxy, cfg)
            driver = proxy.drivers["box"]
            while driver.state is not State.AWAKE:
                await trio.sleep(0.01)
            reply = decode_reply((await post(proxy, {"event": "suspending", "node": "box"})).content)
            assert reply.allowed and reply.state == "DRAINING"
            backend_scope.cancel()
            await backend_stopped.wait()
            # the host sleeps: its port stops answering at all (a full accept queue drops SYNs)
            with socket.socket() as silent, socket.socket() as filler:
                silent.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                silent.bind(("127.0.0.1", backend_port))
                silent.listen(0)
                filler.connect(("127.0.0.1", backend_port))
                answers: list[bytes] = []

                async def client() -> None:
                    answers.append(await request(proxy.route_address()[1], b"morning\n"))

                nursery.start_soon(client)
                await packets.wait_for(1)
                assert driver.state is State.WAKING and driver.held == 1
            # the host resumes and its service comes back
            await nursery.start(serve_backend, backend_port, answer_backend)
            while not answers:
                await trio.sleep(0.01)
            assert answers == [response_for(b"morning\n")]
            nursery.cancel_scope.cancel()


async def test_what_is_held_for_a_node_is_said_to_its_agent(tmp_path: Path) -> None:
    """``GET /v1/nodes/NODE/held`` (what a resuming agent starts first), read through the
    agent's own client: the backend port a held connection waits for, nothing once it left."""
    async with running(tmp_path, backend=False) as (proxy, _, _):
        section = build(ProxySection, {"url": proxy.control_url, "token": "s3cret"},
                        Context(tmp_path / "node-agent.toml"), "proxy")
        agent = ProxyClient(section, "box")
        try:
            assert await agent.held() == HeldWork("box")
            port = proxy.cfg.routes[0].backend_port
            client = await trio.open_tcp_stream(*proxy.route_address())
            while proxy.drivers["box"].held != 1:
                await trio.sleep(0.01)
            assert await agent.held() == HeldWork("box", (), (port,))
            await client.aclose()
            while proxy.drivers["box"].held:
                await trio.sleep(0.01)
            assert await agent.held() == HeldWork("box")
            with pytest.raises(ProxyUnreachable, match="answered 404 to /v1/nodes/other/held"):
                await ProxyClient(section, "other").held()
        finally:
            await agent.aclose()
