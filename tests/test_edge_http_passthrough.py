"""A chunked answer goes to the client as the backend framed it: the same bytes after the
head (chunk extensions and trailers too), with either relay engine, and the client's
connection carries its next request afterwards. Broken framing cuts the answer.

The backend is raw HTTP on a real loopback socket (``raw_backend``), so its framing and its
pauses are exactly what the test says.
"""

from __future__ import annotations

import json
from pathlib import Path

import h11
import httpx
import pytest
import trio

from edge_proxy.history import query
from edge_proxy.service import RelayEngine
from tests.support.edge_http import (
    CHAT,
    TEST_TIMEOUT_S,
    proxy_before,
)
from tests.support.ports import LOOPBACK

HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n")
# Sent in these pieces, with a pause between: a chunk split across writes, an extension, two
# chunks in one write, a trailer.
PIECES = [b"f\r\ndata: {\"a\":1}\n\n\r\n",
          b"f;x=1\r\ndata: {\"a\":2}",
          b"\n\n\r\n",
          b"f\r\ndata: {\"a\":3}\n\n\r\ne\r\ndata: [DONE]\n\n\r\n",
          b"0\r\nx-trailer: yes\r\n\r\n"]
BODY = b"".join(PIECES)


async def framed_stream(stream: trio.SocketStream) -> None:
    await stream.send_all(HEAD)
    for piece in PIECES:
        await trio.sleep(0.02)
        await stream.send_all(piece)
    await trio.sleep(0.2)  # the connection stays open after the answer, as llama-server's


async def _exchange(stream: trio.SocketStream, conn: h11.Connection, request: bytes
                    ) -> tuple[int, bytes, bytes]:
    """Send ``request``; the answer's status, its raw bytes after the head, and its body as
    h11 decodes them."""
    await stream.send_all(request)
    raw, body, status = b"", b"", 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            raw += data
            conn.receive_data(data)
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += bytes(event.data)
        elif isinstance(event, h11.EndOfMessage):
            return status, raw.split(b"\r\n\r\n", 1)[1], body
        else:
            raise AssertionError(event)


def _request(conn: h11.Connection, method: str, path: str, body: bytes = b"") -> bytes:
    headers = [("host", "proxy"), ("content-type", "application/json"),
               ("content-length", str(len(body)))]
    return (conn.send(h11.Request(method=method, target=path, headers=headers)) or b"") + \
        (conn.send(h11.Data(data=body)) or b"") + (conn.send(h11.EndOfMessage()) or b"")


@pytest.mark.parametrize("engine", ["loop", "trio"])
async def test_a_chunked_answer_reaches_the_client_as_the_backend_framed_it(
        tmp_path: Path, engine: RelayEngine) -> None:
    async with proxy_before(tmp_path, framed_stream, engine=engine) as proxy:
        port = int(proxy.http_routes.url("127.0.0.1:0").rsplit(":", 1)[1])
        stream = await trio.open_tcp_stream(LOOPBACK, port)
        conn = h11.Connection(h11.CLIENT)
        for _ in range(2):  # the second on the same connection: the first ended cleanly
            status, raw, body = await _exchange(
                stream, conn, _request(conn, "POST", "/v1/chat/completions",
                                       json.dumps(CHAT).encode()))
            assert (status, raw) == (200, BODY)
            assert body.count(b"data: ") == 4
            conn.start_next_cycle()
        await stream.aclose()


@pytest.mark.parametrize("engine", ["loop", "trio"])
async def test_broken_framing_in_the_middle_cuts_the_answer(tmp_path: Path,
                                                            engine: RelayEngine) -> None:
    async def garbage_after_one_event(stream: trio.SocketStream) -> None:
        await stream.send_all(HEAD + PIECES[0])
        await trio.sleep(0.05)
        await stream.send_all(b"zz\r\nnot a chunk\r\n")
        await trio.sleep(1)

    async with proxy_before(tmp_path, garbage_after_one_event, engine=engine) as proxy:
        received: list[str] = []
        async with httpx.AsyncClient(base_url=proxy.http_routes.url("127.0.0.1:0"),
                                     timeout=TEST_TIMEOUT_S) as client:
            with pytest.raises(httpx.RemoteProtocolError):
                async with client.stream("POST", "/v1/chat/completions",
                                         json=CHAT) as response:
                    assert response.status_code == 200
                    async for line in response.aiter_lines():
                        received.append(line)
        assert received == ['data: {"a":1}', ""]  # the garbage never reached the client


async def test_an_http_1_0_client_gets_the_stream_until_the_close(tmp_path: Path) -> None:
    async with proxy_before(tmp_path, framed_stream) as proxy:
        port = int(proxy.http_routes.url("127.0.0.1:0").rsplit(":", 1)[1])
        body = json.dumps(CHAT).encode()
        stream = await trio.open_tcp_stream(LOOPBACK, port)
        await stream.send_all(b"POST /v1/chat/completions HTTP/1.0\r\nContent-Type: "
                              b"application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
                              + body)
        answer = b""
        while data := await stream.receive_some(65536):
            answer += data
        head, _, rest = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding" not in head.lower()
        assert rest.count(b"data: ") == 4 and rest.endswith(b"data: [DONE]\n\n")


# A whole answer in the write that carries its head, as a fast llama-server sends a short one:
# the last event has llama-server's numbers.
FINAL = (b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":8},'
         b'"timings":{"prompt_n":5,"prompt_ms":2.0,"prompt_per_second":2500.0,'
         b'"predicted_n":8,"predicted_ms":4.0,"predicted_per_second":2000.0}}\n\n')


async def whole_stream_with_the_head(stream: trio.SocketStream) -> None:
    chunks = [b"data: {\"a\":1}\n\n", FINAL, b"data: [DONE]\n\n"]
    body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    await stream.send_all(HEAD + body)
    await trio.sleep(0.2)


async def test_an_answer_that_came_whole_with_its_head_has_its_numbers_in_history(
        tmp_path: Path) -> None:
    db = tmp_path / "history.sqlite3"
    async with proxy_before(tmp_path, whole_stream_with_the_head, history=db) as proxy:
        url = proxy.http_routes.url("127.0.0.1:0")
        async with httpx.AsyncClient(timeout=TEST_TIMEOUT_S) as client:
            answer = await client.post(f"{url}/v1/chat/completions",
                                       json={**CHAT, "stream": True})
        assert answer.status_code == 200 and FINAL in answer.content
    with query.open_readonly(db) as conn:
        (row,) = query.requests(conn)
    assert (row.prompt_tokens, row.predicted_tokens, row.predicted_per_s) == (5, 8, 2000.0)
