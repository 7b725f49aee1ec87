"""The proxy reads its backends' answer heads and frames its requests by hand
(``answer_head``): the RFC 9112 rules it relies on, pure; then, through a real proxy on
loopback in front of raw-HTTP backends, each way a body can be framed, a head that is not
HTTP, a body cut short, and a kept connection carrying the next request."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from edge_proxy.http_routes.answer_head import (
    AnswerHeadError,
    Framing,
    parse_answer_head,
    request_head,
)
from edge_proxy.service import serve_proxy
from edge_proxy.wake.machine import State
from shared.config.edge import load_edge_config
from tests.support.edge import read_line
from tests.support.edge_http import (
    CHAT,
    HEALTH_OK,
    TEST_TIMEOUT_S,
    Answer,
    NodeSpec,
    proxy_before,
    wait_state,
    write_http_config,
)
from tests.support.ports import LOOPBACK, free_port


def test_a_llama_server_stream_head() -> None:
    head = parse_answer_head(
        b"HTTP/1.1 200 OK\r\nServer: llama.cpp\r\nAccess-Control-Allow-Origin: \r\n"
        b"Content-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
        b"Keep-Alive: timeout=5, max=100\r\n\r\n", "POST")
    assert head.status == 200 and head.framing is Framing.CHUNKED and head.keep_alive
    assert head.headers[1] == (b"Access-Control-Allow-Origin", b"")  # as sent, value empty
    assert head.headers[2] == (b"Content-Type", b"text/event-stream")


@pytest.mark.parametrize(("raw", "method", "framing", "length", "keep_alive"), [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n", "GET", Framing.LENGTH, 12, True),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\n\r\n", "GET", Framing.LENGTH, 3, True),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n", "HEAD", Framing.NONE, 0, True),
    (b"HTTP/1.1 204 No Content\r\n\r\n", "DELETE", Framing.NONE, 0, True),
    (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n", "GET", Framing.NONE, 0, True),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, Chunked\r\n\r\n", "GET", Framing.CHUNKED,
     0, True),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", "GET", Framing.CLOSE,
     0, False),
    (b"HTTP/1.1 200 OK\r\n\r\n", "GET", Framing.CLOSE, 0, False),
    (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n", "GET",
     Framing.LENGTH, 2, False),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n", "GET", Framing.LENGTH, 2, False),
    (b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 2\r\n\r\n", "GET",
     Framing.LENGTH, 2, True),
    (b"HTTP/1.1 200\nContent-Length: 2\n\n", "GET", Framing.LENGTH, 2, True),  # bare LF
])
def test_how_the_body_is_framed_and_whether_the_connection_stays(
        raw: bytes, method: str, framing: Framing, length: int, keep_alive: bool) -> None:
    head = parse_answer_head(raw, method)
    assert (head.framing, head.length, head.keep_alive) == (framing, length, keep_alive)


def test_interim_answers_are_told_apart() -> None:
    assert parse_answer_head(b"HTTP/1.1 100 Continue\r\n\r\n", "POST").informational
    assert not parse_answer_head(b"HTTP/1.1 200 OK\r\n\r\n", "POST").informational


@pytest.mark.parametrize(("raw", "says"), [
    (b"HTTP/2 200\r\n\r\n", "status line"),
    (b"HTTP/2.0 200 OK\r\n\r\n", "not HTTP/1.x"),
    (b"ICY 200 OK\r\n\r\n", "status line"),
    (b"HTTP/1.1 20 OK\r\n\r\n", "status line"),
    (b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n", "bad header line"),
    (b"HTTP/1.1 200 OK\r\nno-colon\r\n\r\n", "bad header line"),
    (b"HTTP/1.1 200 OK\r\nA: b\r\n  folded\r\n\r\n", "folded"),
    (b"HTTP/1.1 200 OK\r\nA: b\x00c\r\n\r\n", "control character"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", "Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n", "both"),
    (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "101"),
    (b"HTTP/1.1 200 OK\r\n", "blank line"),
])
def test_what_is_not_http_is_refused_with_what_is_wrong(raw: bytes, says: str) -> None:
    with pytest.raises(AnswerHeadError, match=says):
        parse_answer_head(raw, "GET")


def test_the_request_head_is_written_as_given_and_cannot_be_split() -> None:
    assert request_head("POST", b"/v1/chat/completions?x=1",
                        [(b"host", b"box:8080"), (b"content-length", b"2")]) == (
        b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nhost: box:8080\r\n"
        b"content-length: 2\r\n\r\n")
    with pytest.raises(ValueError, match="CR or LF"):
        request_head("GET", b"/", [(b"x", b"a\r\nInjected: yes")])
    with pytest.raises(ValueError, match="CR or LF"):
        request_head("GET", b"/ HTTP/1.1\r\nx: y", [])


# ---- through a proxy -----------------------------------------------------------------------

async def _post(proxy_url: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=proxy_url, timeout=TEST_TIMEOUT_S) as client:
        return await client.post("/v1/chat/completions", json={**CHAT, "stream": False})


def _sends(*pieces: bytes, pause_s: float = 0.02) -> Answer:
    async def answer(stream: trio.SocketStream) -> None:
        for piece in pieces:
            await stream.send_all(piece)
            await trio.sleep(pause_s)
    return answer


@pytest.mark.parametrize("answer", [
    _sends(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 10\r\n\r\n",
           b'{"a":', b'"bc"}'),
    _sends(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"
           b'{"a":"bc"}'),
    _sends(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n", b'{"a":', b'"bc"}'),
    _sends(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{\"a\":\"bc\"}"),
], ids=["content-length in pieces", "after 100 Continue", "until the close", "HTTP/1.0"])
async def test_each_framing_reaches_the_client_whole(tmp_path: Path, answer: Answer) -> None:
    async with proxy_before(tmp_path, answer) as proxy:
        response = await _post(proxy.http_routes.url("127.0.0.1:0"))
    assert response.status_code == 200
    assert response.json() == {"a": "bc"}


@pytest.mark.parametrize(("answer", "says"), [
    (_sends(b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n"), "bad header line"),
    (_sends(b"SSH-2.0-OpenSSH_9.6\r\n\r\n"), "not an HTTP/1.x status line"),
], ids=["bad header", "not http"])
async def test_an_answer_that_is_not_http_is_a_502_that_says_why(
        tmp_path: Path, answer: Answer, says: str) -> None:
    async with proxy_before(tmp_path, answer) as proxy:
        response = await _post(proxy.http_routes.url("127.0.0.1:0"))
    assert response.status_code == 502
    assert says in response.json()["error"]["message"]


async def test_a_body_shorter_than_its_content_length_is_cut_for_the_client(
        tmp_path: Path) -> None:
    answer = _sends(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", b'{"a":')
    async with proxy_before(tmp_path, answer) as proxy, httpx.AsyncClient(
            base_url=proxy.http_routes.url("127.0.0.1:0"), timeout=TEST_TIMEOUT_S) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post("/v1/chat/completions", json={**CHAT, "stream": False})


async def test_a_kept_connection_carries_the_next_request(tmp_path: Path) -> None:
    """A backend that keeps its connections (Content-Length answers): three requests, one
    connection; then one that says ``Connection: close`` is not used again."""
    connections = 0
    served_on: list[int] = []  # per chat request, the connection it came on

    async def keep_alive_backend(stream: trio.SocketStream) -> None:
        nonlocal connections
        connections += 1
        mine = connections
        async with stream:
            while True:
                request_line = await read_line(stream)
                if not request_line:
                    return
                head = b""
                while (line := await read_line(stream)) not in (b"\r\n", b""):
                    head += line
                length = next((int(h.split(b":")[1]) for h in head.split(b"\r\n")
                               if h.lower().startswith(b"content-length:")), 0)
                body = b""
                while len(body) < length:
                    body += await stream.receive_some(length - len(body))
                if request_line.startswith(b"GET /health"):
                    await stream.send_all(HEALTH_OK)
                    continue
                served_on.append(mine)
                close = json.loads(body).get("close", False)
                answer = json.dumps({"n": len(served_on)}).encode()
                await stream.send_all(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    + (b"Connection: close\r\n" if close else b"")
                    + b"Content-Length: %d\r\n\r\n" % len(answer) + answer)
                if close:
                    await trio.sleep(0.5)  # the proxy must not wait for the close
                    return

    node = NodeSpec("box", "aa:bb:cc:dd:ee:01", free_port())
    path = write_http_config(tmp_path, [node], free_port())
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(trio.serve_tcp, keep_alive_backend, node.port,
                                        host=LOOPBACK))
            proxy = await nursery.start(partial(serve_proxy, load_edge_config(path)))
            await wait_state(proxy, "box", State.AWAKE)
            url = proxy.http_routes.url("127.0.0.1:0")
            async with httpx.AsyncClient(base_url=url, timeout=TEST_TIMEOUT_S) as client:
                answers = []
                for ask in ({}, {}, {}, {"close": True}, {}):
                    response = await client.post("/v1/chat/completions",
                                                 json={**CHAT, "stream": False, **ask})
                    answers.append(response.json()["n"])
            nursery.cancel_scope.cancel()
    assert answers == [1, 2, 3, 4, 5]
    first = served_on[0]
    assert served_on[:4] == [first] * 4  # one kept connection, until it said close
    assert served_on[4] != first
