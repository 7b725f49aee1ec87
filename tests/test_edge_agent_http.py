"""edge_proxy.agent_http: the proxy's HTTP/1.1 client of an agent API, against servers on
loopback: the project's own server with a real route table, and raw sockets that misbehave
on purpose (a kept connection closed under the client, an answer cut short)."""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import trio

from edge_proxy.agent_http import AgentHttp, AgentHttpError
from shared.config.values import HostPort
from shared.http import App, Request, Response, serve
from tests.support.ports import free_port

TIMEOUT_S = 10.0


def app_with_routes(seen: list[tuple[str, bytes, str | None]]) -> App:
    app = App("test", None)

    @app.route("POST", "/v1/models/{model}/load")
    async def load(req: Request) -> Response:
        seen.append((req.params["model"], req.body, req.headers.get("authorization")))
        return Response.json({"model": req.params["model"], "state": "loaded"})

    @app.route("GET", "/v1/models")
    async def models(req: Request) -> Response:
        return Response.json({"models": [{"model": f"m{i}"} for i in range(5000)]})

    return app


async def test_requests_share_one_kept_connection_and_send_the_headers() -> None:
    seen: list[tuple[str, bytes, str | None]] = []
    peers: set[tuple[str, int]] = set()
    app = app_with_routes(seen)
    handle = app.handle

    async def counting(scope: dict[str, object], client: object) -> None:
        peers.add(scope["client"])  # type: ignore[arg-type]
        await handle(scope, client)  # type: ignore[arg-type]

    app.handle = counting  # type: ignore[method-assign]
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            urls = await nursery.start(serve, app, HostPort("127.0.0.1", 0))
            http = AgentHttp(urls[0] + "/", [(b"authorization", b"Bearer s3cret")])
            first = await http.request("POST", "/v1/models/tiny%2Fa/load", b"{}")
            listed = await http.request("GET", "/v1/models")
            again = await http.request("POST", "/v1/models/b/load", b"{}")
            await http.aclose()
            nursery.cancel_scope.cancel()
    assert (first.status, json.loads(first.body)["model"]) == (200, "tiny/a")
    assert len(json.loads(listed.body)["models"]) == 5000  # more than one read
    assert again.status == 200
    assert seen == [("tiny/a", b"{}", "Bearer s3cret"), ("b", b"{}", "Bearer s3cret")]
    assert len(peers) == 1


@asynccontextmanager
async def raw_server(answer: Callable[[trio.SocketStream, int], Awaitable[None]]
                     ) -> AsyncIterator[AgentHttp]:
    """A server that answers its Nth connection with ``answer(stream, N)``, and a client
    of it."""
    port = free_port()
    count = 0

    async def handler(stream: trio.SocketStream) -> None:
        nonlocal count
        count += 1
        await answer(stream, count)

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(trio.serve_tcp, handler, port,
                                                  host="127.0.0.1"))
            http = AgentHttp(f"http://127.0.0.1:{port}", [])
            yield http
            await http.aclose()
            nursery.cancel_scope.cancel()


async def read_request(stream: trio.SocketStream) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += await stream.receive_some(65536)
    return data


OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"


async def test_a_kept_connection_closed_under_the_client_is_replaced_and_the_request_sent_again(
) -> None:
    connections: list[int] = []

    async def answer(stream: trio.SocketStream, n: int) -> None:
        connections.append(n)
        await read_request(stream)
        await stream.send_all(OK)
        if n == 1:  # the next request on this connection finds it closing, unanswered
            await read_request(stream)
        await stream.aclose()

    async with raw_server(answer) as http:
        assert (await http.request("GET", "/a")).status == 200
        assert (await http.request("GET", "/b")).status == 200
    assert connections == [1, 2]


async def test_an_answer_cut_short_is_an_error_and_not_sent_twice() -> None:
    connections: list[int] = []

    async def answer(stream: trio.SocketStream, n: int) -> None:
        connections.append(n)
        await read_request(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{\"half")
        await stream.aclose()

    async with raw_server(answer) as http:
        with pytest.raises(AgentHttpError, match="RemoteProtocolError"):
            await http.request("POST", "/v1/models/a/load", b"{}")
    assert connections == [1]


async def test_nobody_listening_is_an_error_that_says_so() -> None:
    http = AgentHttp(f"http://127.0.0.1:{free_port()}", [])
    with trio.fail_after(TIMEOUT_S), pytest.raises(AgentHttpError, match="cannot connect"):
        await http.request("GET", "/v1/models")
