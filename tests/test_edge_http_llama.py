"""The real llama-server behind an HTTP route: streams arrive as they are generated, plain
requests and keep-alive sequences work, large bodies pass intact, the OpenAI SDK works."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final

import h11
import httpx
import openai
import pytest
import trio

from edge_proxy.node import State
from edge_proxy.server import Proxy, serve_proxy
from shared.config.edge import load_edge_config
from tests.support.edge import PacketListener
from tests.support.edge_http import (
    TEST_TIMEOUT_S,
    NodeSpec,
    llama_on_port,
    sse_payloads,
    wait_state,
    write_http_config,
)
from tests.support.ports import LOOPBACK, free_port

pytestmark = pytest.mark.llama

MODEL_ALIAS: Final = "tiny"
# Long enough that generation is still running when the first chunk has crossed the proxy.
LONG_GENERATION_TOKENS: Final = 1000
LARGE_TEXT_BYTES: Final = 300_000
KEEPALIVE_ROUNDS: Final = 4


@asynccontextmanager
async def awake_proxy(tmp_path: Path, binary: Path, model: Path) -> AsyncIterator[tuple[str, str]]:
    """llama-server on a node's port and a proxy in front of it; yields (proxy, backend) URLs."""
    node = NodeSpec("box", "aa:bb:cc:dd:ee:01", free_port())
    packets = await PacketListener.open()
    cfg = load_edge_config(write_http_config(tmp_path, [node], packets.port))
    args = ("-c", "2048", "-np", "2", "-t", "1", "--alias", MODEL_ALIAS)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery, llama_on_port(binary, model, node.port, args):
            nursery.start_soon(packets.run)
            proxy: Proxy = await nursery.start(serve_proxy, cfg)
            await wait_state(proxy, "box", State.AWAKE)
            yield proxy.http_routes.url("127.0.0.1:0"), f"http://{LOOPBACK}:{node.port}"
            assert packets.packets == []  # an awake node is never sent a packet
            nursery.cancel_scope.cancel()


async def test_a_stream_arrives_while_it_is_generated(
        tmp_path: Path, llama_server_bin: Path, tiny_model: Path) -> None:
    request = {"messages": [{"role": "user", "content": "hi"}], "stream": True,
               "max_tokens": LONG_GENERATION_TOKENS, "ignore_eos": True}
    async with (
        awake_proxy(tmp_path, llama_server_bin, tiny_model) as (url, backend),
        httpx.AsyncClient(timeout=TEST_TIMEOUT_S) as client,
        client.stream("POST", f"{url}/v1/chat/completions", json=request) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.aiter_lines()
        first = await anext(lines)
        assert first.startswith("data: ")
        # The first chunk is here and the slot is still generating: nothing was buffered.
        slots = (await client.get(f"{backend}/slots")).json()
        assert any(slot["is_processing"] for slot in slots)
        rest = [line async for line in lines]
    payloads = sse_payloads([first, *rest])
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert len(chunks) > LONG_GENERATION_TOKENS // 2
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_plain_requests_on_one_keep_alive_connection(
        tmp_path: Path, llama_server_bin: Path, tiny_model: Path) -> None:
    async with awake_proxy(tmp_path, llama_server_bin, tiny_model) as (url, _):
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
        awake_proxy(tmp_path, llama_server_bin, tiny_model) as (url, _),
        httpx.AsyncClient(base_url=url, timeout=TEST_TIMEOUT_S) as client,
    ):
        tokens = (await client.post("/tokenize", json={"content": content})).json()["tokens"]
        # the token list is a ~2 MB body of its own; it must come back as the same text
        detok = await client.post("/detokenize", json={"tokens": tokens})
        assert detok.status_code == 200
        assert detok.json()["content"] == content


async def test_the_openai_sdk_streams_and_not(
        tmp_path: Path, llama_server_bin: Path, tiny_model: Path) -> None:
    async with awake_proxy(tmp_path, llama_server_bin, tiny_model) as (url, _):
        def use_sdk() -> tuple[str, list[str], list[str]]:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                                   timeout=TEST_TIMEOUT_S)
            with client:
                models = [m.id for m in client.models.list()]
                messages = [{"role": "user", "content": "hi"}]
                plain = client.chat.completions.create(model=MODEL_ALIAS, messages=messages,  # type: ignore[arg-type]
                                                       max_tokens=4)
                stream = client.chat.completions.create(model=MODEL_ALIAS, messages=messages,  # type: ignore[arg-type]
                                                        max_tokens=6, stream=True)
                deltas = [c.choices[0].delta.content or "" for c in stream if c.choices]
            return plain.choices[0].finish_reason, deltas, models

        finish, deltas, models = await trio.to_thread.run_sync(use_sdk)
    assert MODEL_ALIAS in models
    assert finish == "length"
    assert len([d for d in deltas if d]) >= 3
