"""One client request and its answer: reading the body, answering, SSE mode, and passing a
chunked answer through as the backend framed it."""

from __future__ import annotations

from collections.abc import Awaitable

from edge_proxy.errors import BodyTooLarge, ClientLeft
from edge_proxy.history.hooks import RequestLog
from edge_proxy.history.records import Outcome
from edge_proxy.http_routes import waking
from edge_proxy.http_routes.framing import ChunkedScanner
from edge_proxy.http_routes.headers import RawHeaders
from shared.h1 import Client, ClientGone, Scope


class Exchange:
    """The response side of one request. Once ``started`` the status and headers are sent;
    an error after that can only be an SSE ``data:`` event (see ``fail``)."""

    def __init__(self, scope: Scope, client: Client, log: RequestLog | None = None) -> None:
        self.scope = scope
        self.log = log  # the request's history row, fed as the answer passes
        self.client = client
        self.started = False
        self.status = 0
        self.finished = False
        # A body being passed through (``passthrough``): the relay loop may have sent its
        # last byte before trio hears so; the scanner knows.
        self.passing: ChunkedScanner | None = None
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
            try:
                chunk = await self.client.receive_body()
            except ClientGone:
                raise ClientLeft(f"after {size} bytes of the request body") from None
            if chunk is None:
                return b"".join(chunks)
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"request body over {limit} bytes")
            chunks.append(chunk)

    def complete(self) -> bool:
        """The whole answer went to the client (or, passed through, its end was read and is
        being written: a client that closes now has it all)."""
        return self.finished or (self.passing is not None and self.passing.done)

    async def wait_gone(self) -> None:
        """Return once the client leaves (its request read; the answer under way)."""
        await self.client.wait_gone()

    def answer_coming(self, status: int, headers: RawHeaders) -> None:
        """The answer's status and headers are known and go out next: the history row
        starts reading its body from here (a pass-through scans the body bytes that came
        with the head before the head is sent, and may find the whole answer in them)."""
        if self.log is not None:
            content_type = next((v for k, v in headers if k.lower() == b"content-type"), None)
            self.log.response_started(status, content_type.decode("latin-1")
                                      if content_type is not None else None)

    def _started(self, status: int, headers: RawHeaders) -> None:
        self.started = True
        self.status = status
        self.answer_coming(status, headers)

    async def start(self, status: int, headers: RawHeaders) -> None:
        self._started(status, headers)
        await self._sent(self.client.start(status, headers))

    async def start_raw(self, status: int, headers: RawHeaders, raw: bytes) -> None:
        """Status and headers, and in the same write ``raw``: the start of a body framed as
        chunked already (what follows goes through ``RelayLoop.pass_answer``)."""
        self._started(status, headers)
        await self._sent(self.client.start_raw(status, headers, raw))

    async def body(self, chunk: bytes) -> None:
        if chunk:
            if self.log is not None:
                self.log.body(chunk)
            await self._sent(self.client.send(chunk))

    async def body_raw(self, raw: bytes) -> None:
        """Bytes of a body framed as chunked already (a pass-through: its payload reaches
        the history row through ``passthrough.PayloadTap``)."""
        if raw:
            await self._sent(self.client.send_raw(raw))

    async def end(self, last: bytes = b"") -> None:
        self.finished = True
        if self.log is not None:
            self.log.body(last)
        await self._sent(self.client.send(last, end=True))

    def passed_through(self) -> None:
        """The rest of the body and its end went out raw: the answer is complete."""
        self.finished = True
        self.client.passed_through()

    async def respond(self, status: int, headers: RawHeaders, body: bytes) -> None:
        """A whole answer at once, in one write (headers must not include
        ``content-length``)."""
        headers = [*headers, (b"content-length", str(len(body)).encode())]
        self._started(status, headers)
        self.finished = True
        if self.log is not None:
            self.log.body(body)
        await self._sent(self.client.start(status, headers, body, end=True))

    async def _sent(self, sending: Awaitable[None]) -> None:
        """A write to the client; one that fails means the client left."""
        try:
            await sending
        except ClientGone as exc:
            self.finished = False
            raise ClientLeft(f"while the answer was sent: {exc}") from None

    async def fail(self, status: int, message: str, kind: str, *, code: str | None = None,
                   headers: RawHeaders | None = None) -> None:
        """An OpenAI-shaped error from the proxy: a JSON answer, or one SSE event once started."""
        payload = waking.error_json(message, kind, code)
        if self.started:
            await self.end(waking.error_event(payload))
            return
        extra = headers or []
        await self.respond(status, [(b"content-type", b"application/json"), *extra], payload)
