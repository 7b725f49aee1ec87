"""What the proxy refuses before any node hears of a request: malformed framing (RFC 9112),
unknown HTTP versions, bodies that are not JSON on JSON endpoints, a non-string ``model``, and
a body that drips in slower than ``request_body_timeout_s``. Each is answered by the proxy
itself, counted in ``edge_http_refused_total``, and sends no magic packet to the sleeping node.

Requests are raw bytes on a real loopback socket (httpx would not send most of them); the node
sleeps because nothing listens on its backend port.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from edge_proxy.http_routes.intake import head_problem
from edge_proxy.http_routes.metrics import LogThrottle
from edge_proxy.http_routes.models import body_problem
from edge_proxy.service import Proxy, serve_proxy
from edge_proxy.wake.machine import State
from shared.config.edge import load_edge_config
from tests.support.edge import PacketListener, read_all
from tests.support.edge_http import (
    TEST_TIMEOUT_S,
    NodeSpec,
    packets_for,
    wait_state,
    write_http_config,
)
from tests.support.ports import LOOPBACK, free_port

NODE = NodeSpec("box", "aa:bb:cc:dd:ee:01", 0)
# A refused request is answered at once; a request that (wrongly) reached the wake path is held
# for the node's wake_timeout_s (60 s) instead, so this bound tells the two apart.
ANSWER_WAIT_S = 10.0
BODY_TIMEOUT_S = 0.5
DRIP_INTERVAL_S = 0.05


@asynccontextmanager
async def sleeping_proxy(tmp_path: Path, http: str = "") -> AsyncIterator[tuple[Proxy, int,
                                                                            PacketListener]]:
    """A proxy whose one HTTP route fronts a node that sleeps; yields it, its port, packets."""
    node = NodeSpec(NODE.name, NODE.mac, free_port())
    packets = await PacketListener.open()
    path = write_http_config(tmp_path, [node], packets.port, http=http)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(packets.run)
            proxy: Proxy = await nursery.start(serve_proxy, load_edge_config(path))
            await wait_state(proxy, NODE.name, State.ASLEEP)
            port = int(proxy.http_routes.url("127.0.0.1:0").rsplit(":", 1)[1])
            yield proxy, port, packets
            nursery.cancel_scope.cancel()


async def exchange(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``data``, read until the proxy closes: status, headers, body."""
    stream = await trio.open_tcp_stream(LOOPBACK, port)
    async with stream:
        await stream.send_all(data)
        with trio.fail_after(ANSWER_WAIT_S):
            raw = await read_all(stream)  # to EOF: each of these answers closes the connection
    return parse(raw)


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def post(path: str, body: bytes, *, extra: str = "Connection: close\r\n") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


def refused(proxy: Proxy, reason: str) -> float:
    value = proxy.metrics.registry.get_sample_value(
        "edge_http_refused_total", {"route": "127.0.0.1:0", "reason": reason})
    return value or 0.0


def assert_proxy_error(body: bytes, fragment: str) -> None:
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and error["source"] == "edge-proxy"
    assert fragment in error["message"] and "\n" not in error["message"]


async def test_both_content_length_and_transfer_encoding_is_400_and_closes(
        tmp_path: Path) -> None:
    smuggle = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nContent-Length: 4\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
               # a second request on the same connection: must never be read
               b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nContent-Length: 2\r\n\r\n{}")
    async with sleeping_proxy(tmp_path) as (proxy, port, packets):
        status, headers, body = await exchange(port, smuggle)
        assert status == 400 and headers["connection"] == "close"
        assert_proxy_error(body, "RFC 9112")
        assert b"HTTP/1.1" not in body  # one answer only: the second request was not served
        assert refused(proxy, "framing") == 1
        assert packets_for(packets, NODE.mac) == 0


@pytest.mark.parametrize("version", ["9.9", "2.0", "0.9"])
async def test_an_unknown_http_version_is_505(tmp_path: Path, version: str) -> None:
    async with sleeping_proxy(tmp_path) as (proxy, port, packets):
        request = f"POST /v1/chat/completions HTTP/{version}\r\nHost: proxy\r\n" \
                  "Content-Length: 2\r\n\r\n{}"
        status, headers, body = await exchange(port, request.encode())
        assert status == 505 and headers["connection"] == "close"
        assert_proxy_error(body, f"HTTP/{version} is not supported")
        assert refused(proxy, "http_version") == 1
        assert packets_for(packets, NODE.mac) == 0


async def test_http_1_0_is_still_served(tmp_path: Path) -> None:
    async with sleeping_proxy(tmp_path) as (proxy, port, _):
        status, _, body = await exchange(port, b"GET /health HTTP/1.0\r\nHost: proxy\r\n\r\n")
        assert status == 503  # a poll while asleep with nothing cached: the usual answer
        assert json.loads(body)["error"]["type"] == "service_unavailable"
        assert refused(proxy, "http_version") == 0


@pytest.mark.parametrize("path, body, fragment", [
    ("/v1/chat/completions", b'{"model": 123, "messages": []}', "'model' must be a string"),
    ("/v1/chat/completions", b"model=qwen", "not valid JSON"),
    ("/v1/chat/completions", b"", "not valid JSON"),
    ("/v1/completions", b'{"model": ["a"], "prompt": "x"}', "'model' must be a string"),
    ("/v1/completions", b"{prompt: x}", "not valid JSON"),
    ("/completion", b"\xff\xfe", "not valid JSON"),
    ("/v1/embeddings", b'["input"]', "is a JSON list"),
    ("/v1/embeddings", b'{"input": "x", "model": {"id": 1}}', "'model' must be a string"),
])
async def test_a_bad_json_request_is_refused_without_a_wake(
        tmp_path: Path, path: str, body: bytes, fragment: str) -> None:
    async with sleeping_proxy(tmp_path) as (proxy, port, packets):
        status, _, answer = await exchange(port, post(path, body))
        assert status == 400
        assert_proxy_error(answer, fragment)
        assert refused(proxy, "bad_request") == 1
        assert packets_for(packets, NODE.mac) == 0
        assert proxy.drivers[NODE.name].state is State.ASLEEP
        # and a good request does wake the node: the packet listener hears the proxy
        stream = await trio.open_tcp_stream(LOOPBACK, port)
        async with stream:
            await stream.send_all(post(path, b'{"model": "m", "prompt": "x", "input": "x"}'))
            await packets.wait_for(1)
        assert packets_for(packets, NODE.mac) >= 1


async def test_a_dripping_body_is_answered_408_and_counted(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="edge_proxy.http_routes")
    async with sleeping_proxy(tmp_path, http=f"request_body_timeout_s = {BODY_TIMEOUT_S}") \
            as (proxy, port, packets):
        stream = await trio.open_tcp_stream(LOOPBACK, port)
        async with stream, trio.open_nursery() as nursery:
            await stream.send_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n"
                                  b"Content-Length: 4096\r\n\r\n{")

            async def drip() -> None:
                while True:
                    await stream.send_all(b" ")
                    await trio.sleep(DRIP_INTERVAL_S)

            nursery.start_soon(drip)
            with trio.fail_after(ANSWER_WAIT_S):
                raw = b""
                while b"\r\n\r\n" not in raw or len(raw) < raw.index(b"\r\n\r\n") + 20:
                    chunk = await stream.receive_some()
                    assert chunk, f"closed without an answer after {raw!r}"
                    raw += chunk
            nursery.cancel_scope.cancel()
        status, headers, _ = parse(raw)
        assert status == 408 and headers["connection"] == "close"
        assert refused(proxy, "body_timeout") == 1
        assert packets_for(packets, NODE.mac) == 0
        lines = [r.getMessage() for r in caplog.records if "body_timeout" in r.getMessage()]
        assert len(lines) == 1 and "POST /v1/chat/completions" in lines[0]


# ---- the pure parts ------------------------------------------------------------------------


def test_head_problems() -> None:
    assert head_problem("1.1", [(b"content-length", b"2")]) is None
    assert head_problem("1.0", []) is None
    assert head_problem("1.2", []) is None  # RFC 9110 2.5: a higher minor is served as 1.1
    for version in ("9.9", "2.0", "2", "0.9", "11.1"):  # HTTP routes speak HTTP/1.x
        problem = head_problem(version, [])
        assert problem is not None and problem.status == 505
    both = head_problem("1.1", [(b"Content-Length", b"2"), (b"transfer-encoding", b"chunked")])
    assert both is not None and (both.status, both.reason) == (400, "framing")


def test_body_problems() -> None:
    assert body_problem("POST", "/v1/chat/completions", b'{"model": "q", "messages": []}') is None
    assert body_problem("POST", "/v1/chat/completions", b'{"messages": []}') is None
    assert body_problem("POST", "/v1/chat/completions", b'{"model": null}') is None
    assert body_problem("POST", "/tokenize", b"not json") is None  # not a model endpoint
    assert body_problem("GET", "/v1/models", b"") is None
    problem = body_problem("POST", "/v1/chat/completions", b'{"model": true}')
    assert problem is not None and "not true" in problem


def test_log_throttle_keeps_one_line_per_interval_and_counts_the_rest() -> None:
    throttle = LogThrottle(10.0)
    assert throttle.admit("held_limit", 100.0) == 0
    assert [throttle.admit("held_limit", t) for t in (100.5, 104.0, 109.9)] == [None] * 3
    assert throttle.admit("body_timeout", 101.0) == 0  # each reason has its own line
    assert throttle.admit("held_limit", 110.0) == 3
    assert throttle.admit("held_limit", 125.0) == 0
