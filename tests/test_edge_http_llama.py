"""The real llama-server behind an HTTP route: streams arrive as they are generated, plain
requests and keep-alive sequences work, large bodies pass intact, the OpenAI SDK works."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final, NamedTuple

import h11
import httpx
import openai
import psutil
import pytest
import trio

from edge_proxy.http_routes.upstream import UPSTREAM_KEEPALIVE_EXPIRY_S
from edge_proxy.service import Proxy, serve_proxy
from edge_proxy.wake.machine import State
from shared.config.edge import load_edge_config
from shared.events import EVENTS_PATH
from tests.support.edge import PacketListener
from tests.support.edge_http import (
    POLL_S,
    TEST_TIMEOUT_S,
    TOKEN,
    NodeSpec,
    llama_on_port,
    sse_payloads,
    wait_state,
    write_http_config,
)
from tests.support.llama import LogLines
from tests.support.ports import LOOPBACK, free_port

pytestmark = pytest.mark.llama

MODEL_ALIAS: Final = "tiny"
# Long enough that generation is still running when the first chunk has crossed the proxy
# (seconds on a loaded machine), short enough to fit the slot's context with the prompt.
LONG_GENERATION_TOKENS: Final = 1900
LARGE_TEXT_BYTES: Final = 300_000
CHUNKED_PIECE_BYTES: Final = 65_521  # a prime: pieces never line up with anything
KEEPALIVE_ROUNDS: Final = 4


class Setup(NamedTuple):
    url: str  # the proxy's HTTP route
    backend: str  # llama-server itself
    control: str  # the proxy's control endpoint, for tests that speak as the node's agent
    log: LogLines  # llama-server's output


@asynccontextmanager
async def awake_proxy(tmp_path: Path, binary: Path, model: Path, *, http: str = ""
                      ) -> AsyncIterator[Setup]:
    """llama-server on a node's port and a proxy in front of it."""
    node = NodeSpec("box", "aa:bb:cc:dd:ee:01", free_port())
    packets = await PacketListener.open()
    cfg = load_edge_config(write_http_config(tmp_path, [node], packets.port, http=http))
    args = ("-c", "2048", "-np", "1", "-t", "1", "--alias", MODEL_ALIAS)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery, \
                llama_on_port(binary, model, node.port, args) as log:
            nursery.start_soon(packets.run)
            proxy: Proxy = await nursery.start(serve_proxy, cfg)
            await wait_state(proxy, "box", State.AWAKE)
            yield Setup(proxy.http_routes.url("127.0.0.1:0"), f"http://{LOOPBACK}:{node.port}",
                        proxy.control_url, log)
            assert packets.packets == []  # an awake node is never sent a packet
            nursery.cancel_scope.cancel()


async def test_a_stream_arrives_while_it_is_generated(
        tmp_path: Path, llama_server_bin: Path, tiny_model: Path) -> None:
    request = {"messages": [{"role": "user", "content": "hi"}], "stream": True,
               "max_tokens": LONG_GENERATION_TOKENS, "ignore_eos": True}
    async with (
        awake_proxy(tmp_path, llama_server_bin, tiny_model) as setup,
        httpx.AsyncClient(timeout=TEST_TIMEOUT_S) as client,
        client.stream("POST", f"{setup.url}/v1/chat/completions", json=request) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.aiter_lines()
        first = await anext(lines)
        assert first.startswith("data: ")
        # The first chunk is here and the slot is still generating: nothing was buffered.
        slots = (await client.get(f"{setup.backend}/slots")).json()
        assert any(slot["is_processing"] for slot in slots)
        rest = [line async for line in lines]
    payloads = sse_payloads([first, *rest])
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert len(chunks) > LONG_GENERATION_TOKENS // 2
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_plain_requests_on_one_keep_alive_connection(
        tmp_path: Path, llama_server_bin: Path, tiny_model: Path) -> None:
    async with awake_proxy(tmp_path, llama_server_bin, tiny_model) as (url, *_):
        host, port = url.removeprefix("http://").rsplit(":", 1)
        stream = await trio.open_tcp_stream(host, int(port))
        conn = h11.Connection(h11.CLIENT)
        async with stream:
            for i in range(KEEPALIVE_ROUNDS):
                body = json.dumps({"messages": [{"role": "user", "content": f"round {i}"}],
                                   "max_tokens": 3}).encode()
                status, answer = await _exchange(stream, conn, b"POST", b"/v1/chat/completions",
                                                 body)
                assert status == 200
                assert json.loads(answer)["choices"][0]["message"]["role"] == "assistant"
                status, answer = await _exchange(stream, conn, b"GET", b"/health", b"")
                assert status == 200 and json.loads(answer) == {"status": "ok"}


async def _exchange(stream: trio.SocketStream, conn: h11.Connection, method: bytes,
                    target: bytes, body: bytes) -> tuple[int, bytes]:
    headers = [(b"host", b"proxy"), (b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    await stream.send_all(conn.send(h11.Request(method=method, target=target, headers=headers)))
    await stream.send_all(conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
    status, parts = 0, []
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(1 << 16))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            parts.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            conn.start_next_cycle()  # raises unless both sides keep the connection open
            return status, b"".join(parts)


async def test_large_request_bodies_pass_intact(
        tmp_path: Path, llama_server_bin: Path, tiny_model: Path) -> None:
    # Every byte value but NUL, in an order that repeats rarely; byte-level vocab: 1 token/byte.
    text = bytes((i * 7919 + i // 255) % 255 + 1 for i in range(LARGE_TEXT_BYTES))
    content = text.decode("latin-1")
    async with (
        awake_proxy(tmp_path, llama_server_bin, tiny_model) as (url, *_),
        httpx.AsyncClient(base_url=url, timeout=TEST_TIMEOUT_S) as client,
    ):
        tokens = (await client.post("/tokenize", json={"content": content})).json()["tokens"]
        # the token list is a ~2 MB body of its own; it must come back as the same text
        detok = await client.post("/detokenize", json={"tokens": tokens})
        assert detok.status_code == 200
        assert detok.json()["content"] == content

        # the same body sent chunked (no Content-Length), in pieces of odd sizes, after asking
        # whether to send it at all (as curl does for large bodies)
        payload = json.dumps({"tokens": tokens}).encode()

        async def pieces() -> AsyncIterator[bytes]:
            for start in range(0, len(payload), CHUNKED_PIECE_BYTES):
                yield payload[start:start + CHUNKED_PIECE_BYTES]

        chunked = await client.post("/detokenize", content=pieces(),
                                    headers={"content-type": "application/json",
                                             "expect": "100-continue"})
        assert chunked.request.headers["transfer-encoding"] == "chunked"
        assert chunked.json()["content"] == content


async def test_the_openai_sdk_streams_and_not(
        tmp_path: Path, llama_server_bin: Path, tiny_model: Path) -> None:
    async with awake_proxy(tmp_path, llama_server_bin, tiny_model) as setup:
        def use_sdk() -> tuple[str | None, list[str | None], list[str]]:
            client = openai.OpenAI(base_url=f"{setup.url}/v1", api_key="unused", max_retries=0,
                                   timeout=TEST_TIMEOUT_S)
            with client:
                models = [m.id for m in client.models.list()]
                messages = [{"role": "user", "content": "hi"}]
                plain = client.chat.completions.create(
                    model=MODEL_ALIAS, messages=messages, max_tokens=4,  # type: ignore[arg-type]
                    extra_body={"ignore_eos": True})
                # Greedy: a sampled answer of random byte tokens may hold every byte back
                # until the end (no whole UTF-8 character before), and come as one chunk.
                stream = client.chat.completions.create(
                    model=MODEL_ALIAS, messages=messages, max_tokens=6,  # type: ignore[arg-type]
                    stream=True, temperature=0, extra_body={"ignore_eos": True})
                finishes = [c.choices[0].finish_reason for c in stream if c.choices]
            return plain.choices[0].finish_reason, finishes, models

        finish, finishes, models = await trio.to_thread.run_sync(use_sdk)
    assert MODEL_ALIAS in models
    assert finish == "length"
    # several chunks (llama-server holds bytes back until they form whole UTF-8 characters)
    assert len(finishes) >= 2 and finishes[:-1] == [None] * (len(finishes) - 1)
    assert finishes[-1] == "length"


async def test_a_stream_keeps_the_node_busy_and_a_client_that_leaves_stops_it(
        tmp_path: Path, llama_server_bin: Path, tiny_model: Path) -> None:
    request = {"messages": [{"role": "user", "content": "hi"}], "stream": True,
               "max_tokens": LONG_GENERATION_TOKENS, "ignore_eos": True}
    async with (
        awake_proxy(tmp_path, llama_server_bin, tiny_model) as setup,
        httpx.AsyncClient(timeout=TEST_TIMEOUT_S) as client,
    ):
        async with client.stream("POST", f"{setup.url}/v1/chat/completions",
                                 json=request) as response:
            await anext(response.aiter_lines())
            # while a stream is open the node's agent is told no when it asks to suspend
            veto = await client.post(f"{setup.control}{EVENTS_PATH}",
                                     json={"event": "suspending", "node": "box"},
                                     headers={"authorization": f"Bearer {TOKEN}"})
            assert veto.json()["allowed"] is False
            assert veto.json()["in_flight"] == 1
        # the client hung up mid-stream: the proxy closes its upstream request, so llama-server
        # stops generating instead of finishing a thousand tokens for nobody
        (released,) = await setup.log.wait_for("stop processing: n_tokens =")
        assert int(released.split("n_tokens =")[1].split(",")[0]) < LONG_GENERATION_TOKENS
        assert setup.log.matching("cancel task")


async def test_idle_upstream_connections_close_soon(
        tmp_path: Path, llama_server_bin: Path, tiny_model: Path) -> None:
    # The node agent counts open connections to llama-server as activity: an idle pooled
    # connection must not outlive UPSTREAM_KEEPALIVE_EXPIRY_S by much.
    async with (
        awake_proxy(tmp_path, llama_server_bin, tiny_model) as setup,
        httpx.AsyncClient(base_url=setup.url, timeout=TEST_TIMEOUT_S) as client,
    ):
        port = int(setup.backend.rsplit(":", 1)[1])
        assert (await client.get("/props")).status_code == 200
        opened = trio.current_time()
        while _connections_to(port):
            await trio.sleep(POLL_S)
        assert trio.current_time() - opened < UPSTREAM_KEEPALIVE_EXPIRY_S * 10


def _connections_to(port: int) -> int:
    me = psutil.Process()
    return sum(1 for c in me.net_connections("tcp") if c.raddr and c.raddr.port == port
               and c.status == psutil.CONN_ESTABLISHED)


async def test_a_body_over_the_limit_is_refused_in_openai_shape(
        tmp_path: Path, llama_server_bin: Path, tiny_model: Path) -> None:
    async with (
        awake_proxy(tmp_path, llama_server_bin, tiny_model, http="max_request_bytes = 4096")
        as setup,
        httpx.AsyncClient(base_url=setup.url, timeout=TEST_TIMEOUT_S) as client,
    ):
        answer = await client.post("/v1/chat/completions", content=b"{" + b" " * 5000 + b"}")
        assert answer.status_code == 413
        assert answer.json()["error"]["source"] == "edge-proxy"
        assert "max_request_bytes" in answer.json()["error"]["message"]
