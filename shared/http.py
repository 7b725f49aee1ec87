"""The control APIs of both services: a route table served by ``shared.h1`` on trio.

Routes map ``(METHOD, "/path/{param}")`` to ``async def handler(req) -> Response``. Errors are
JSON ``{"error": {"message", "type", "source"}}`` (OpenAI's shape plus the source), so a person can
tell whether llamanap or the model said it. Bearer tokens are compared in constant time.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import re
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from shared.config.loader import Secret
from shared.config.values import HostPort
from shared.h1 import Client, ClientGone, H1Server, Scope, listener_url

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20  # control requests are small; a larger body is a mistake or an attack
# An idle client connection (the proxy's agent client, a dashboard's polls) closes after this.
KEEP_ALIVE_S = 5.0
# Requests in flight when the service stops its API (only a stop that is not a cancel).
SHUTDOWN_GRACE_S = 2.0


@dataclass
class Request:
    method: str
    path: str
    params: dict[str, str]
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The body as JSON; a malformed body raises ``HTTPError(400)``."""
        try:
            return json.loads(self.body or b"null")
        except (ValueError, UnicodeDecodeError) as exc:
            raise HTTPError(400, f"body is not valid JSON: {exc}") from exc


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def json(cls, data: Any, status: int = 200) -> Response:
        return cls(status, json.dumps(data, indent=1, default=str).encode() + b"\n")

    @classmethod
    def text(cls, text: str, status: int = 200, content_type: str = "text/plain") -> Response:
        return cls(status, text.encode(), f"{content_type}; charset=utf-8")


class HTTPError(Exception):
    """Raised by handlers; becomes a JSON error response."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind


def error_body(message: str, kind: str, source: str) -> dict[str, Any]:
    """OpenAI-shaped error with a ``source`` field naming the llamanap service."""
    return {"error": {"message": message, "type": kind, "source": source}}


Handler = Callable[[Request], Awaitable[Response]]


class App:
    """A route table and an optional bearer token for every route but public ones."""

    def __init__(self, source: str, token: Secret | None, public: frozenset[str] = frozenset()):
        self.source = source
        self.token = token
        self.public = public  # paths readable without a token (e.g. /metrics for Prometheus)
        self._routes: list[tuple[str, re.Pattern[str], str, Handler]] = []

    def route(self, method: str, pattern: str) -> Callable[[Handler], Handler]:
        regex = re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern) + "$")

        def decorate(handler: Handler) -> Handler:
            self._routes.append((method, regex, pattern, handler))
            return handler

        return decorate

    async def handle(self, scope: Scope, client: Client) -> None:
        """Answer one request (``h1.H1Server``'s handler): always one whole JSON or text answer."""
        try:
            response = await self._dispatch(scope, client)
        except ClientGone:
            return
        except HTTPError as exc:
            response = Response.json(error_body(exc.message, exc.kind, self.source), exc.status)
        except Exception as exc:  # a bug must not kill the control API; log it with traceback
            log.exception("control API %s %s failed", scope["method"], scope["path"])
            response = Response.json(error_body(f"internal error: {exc}", "server_error", self.source), 500)
        headers = [(b"content-type", response.content_type.encode()),
                   (b"content-length", str(len(response.body)).encode())]
        headers += [(k.encode(), v.encode()) for k, v in response.headers]
        body = b"" if scope["method"] == "HEAD" else response.body
        with contextlib.suppress(ClientGone):
            await client.start(response.status, headers, body, end=True)

    async def _dispatch(self, scope: Scope, client: Client) -> Response:
        path: str = scope["path"]
        method: str = scope["method"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if path not in self.public:
            self._authorize(headers.get("authorization", ""))
        allowed: list[str] = []
        # Matched still percent-encoded: a parameter may hold a "/" (a model named
        # "org/model" is sent as org%2Fmodel), decoded once it is cut out.
        raw = scope.get("raw_path", path.encode()).decode("latin-1")
        for route_method, regex, _, handler in self._routes:
            m = regex.match(raw)
            if not m:
                continue
            if route_method != method:
                allowed.append(route_method)
                continue
            body = await _read_body(client)
            query = dict(
                part.split("=", 1) if "=" in part else (part, "")
                for part in scope.get("query_string", b"").decode("latin-1").split("&") if part
            )
            params = {k: urllib.parse.unquote(v) for k, v in m.groupdict().items()}
            return await handler(Request(method, path, params, query, headers, body))
        if allowed:
            raise HTTPError(405, f"{method} not allowed on {path}; use {', '.join(sorted(set(allowed)))}")
        raise HTTPError(404, f"no such endpoint: {path}", "not_found_error")

    def _authorize(self, header: str) -> None:
        if self.token is None:
            return
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise HTTPError(401, "missing bearer token; send 'Authorization: Bearer TOKEN'",
                            "authentication_error")
        if not hmac.compare_digest(given.encode(), self.token.reveal().encode()):
            raise HTTPError(401, "wrong bearer token", "authentication_error")


async def _read_body(client: Client) -> bytes:
    """The whole request body; ``HTTPError(413)`` past ``MAX_BODY_BYTES``, ``ClientGone``."""
    chunks: list[bytes] = []
    size = 0
    while (chunk := await client.receive_body()) is not None:
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise HTTPError(413, f"request body over {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def metrics_response(registry: CollectorRegistry) -> Response:
    return Response(200, generate_latest(registry), CONTENT_TYPE_LATEST)


async def serve(
    app: App,
    listen: HostPort,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``listen`` until cancelled; ``task_status`` gets the bound URLs.
    Raises ``OSError`` when it cannot listen (the caller names the config key)."""
    listeners = await trio.open_tcp_listeners(listen.port, host=listen.host)
    server = H1Server(app.handle, keep_alive_s=KEEP_ALIVE_S, grace_s=SHUTDOWN_GRACE_S)
    task_status.started([listener_url(listener) for listener in listeners])
    await server.serve(listeners, trio.sleep_forever)
