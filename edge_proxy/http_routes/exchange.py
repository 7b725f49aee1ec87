"""One client request/response on the ASGI side: reading the body, answering, SSE mode."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from edge_proxy.errors import BodyTooLarge, ClientLeft
from edge_proxy.history.hooks import RequestLog
from edge_proxy.history.records import Outcome
from edge_proxy.http_routes import waking
from edge_proxy.http_routes.headers import RawHeaders

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class Exchange:
    """The response side of one request. Once ``started`` the status and headers are sent;
    an error after that can only be an SSE ``data:`` event (see ``fail``)."""

    def __init__(self, scope: Scope, receive: Receive, send: Send,
                 log: RequestLog | None = None) -> None:
        self.scope = scope
        self.log = log  # the request's history row, fed as the answer passes
        self.receive = receive
        self._send = send
        self.started = False
        self.status = 0
        self.finished = False
        self.node = ""  # the node the request goes to, once chosen
        self.backend = ""  # its backend's key on the listener (models.backend_keys)
        self.model = ""  # the model label it is counted under (models.Routed.model)

    def routed_to(self, node: str, model: str | None = None, backend: str | None = None) -> None:
        self.node = node
        self.backend = backend or node
        self.model = model or ""
        if self.log is not None:
            self.log.routed(node, model)

    def outcome(self, outcome: Outcome) -> None:
        """How the request ended, for its history row, where the route knows better than
        ``RequestLog.finish`` can infer (answered from the cache, refused, wake timed out)."""
        if self.log is not None:
            self.log.outcome = outcome

    @property
    def method(self) -> str:
        method: str = self.scope["method"]
        return method

    @property
    def path(self) -> str:
        path: str = self.scope["path"]
        return path

    @property
    def query(self) -> bytes:
        query: bytes = self.scope.get("query_string", b"")
        return query

    @property
    def target(self) -> bytes:
        """The request target as the client sent it (path still percent-encoded)."""
        raw: bytes = self.scope.get("raw_path") or self.scope["path"].encode()
        return raw + b"?" + self.query if self.query else raw

    async def read_body(self, limit: int) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise ClientLeft(f"after {size} bytes of the request body")
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"request body over {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        return b"".join(chunks)

    async def start(self, status: int, headers: RawHeaders) -> None:
        self.started = True
        self.status = status
        if self.log is not None:
            content_type = next((v for k, v in headers if k.lower() == b"content-type"), None)
            self.log.response_started(status, content_type.decode("latin-1")
                                      if content_type is not None else None)
        await self._send({"type": "http.response.start", "status": status, "headers": headers})

    async def body(self, chunk: bytes) -> None:
        if chunk:
            if self.log is not None:
                self.log.body(chunk)
            await self._send({"type": "http.response.body", "body": chunk, "more_body": True})

    async def end(self, last: bytes = b"") -> None:
        self.finished = True
        if self.log is not None:
            self.log.body(last)
        await self._send({"type": "http.response.body", "body": last, "more_body": False})

    async def respond(self, status: int, headers: RawHeaders, body: bytes) -> None:
        """A whole answer at once (headers must not include ``content-length``)."""
        await self.start(status, [*headers, (b"content-length", str(len(body)).encode())])
        await self.end(body)

    async def fail(self, status: int, message: str, kind: str, *, code: str | None = None,
                   headers: RawHeaders | None = None) -> None:
        """An OpenAI-shaped error from the proxy: a JSON answer, or one SSE event once started."""
        payload = waking.error_json(message, kind, code)
        if self.started:
            await self.end(waking.error_event(payload))
            return
        extra = headers or []
        await self.respond(status, [(b"content-type", b"application/json"), *extra], payload)
