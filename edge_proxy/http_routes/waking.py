"""What a client sees while its request waits for a node, and when the wait fails.

A streaming request (``"stream": true``) that is held gets an SSE answer at once after
``waking_comment_interval_s``: ``200 text/event-stream`` and a comment line per interval
(``: waking gpubox 12 s``), which SSE clients ignore and which keep clients and reverse
proxies in front from timing out. Errors are OpenAI-shaped JSON with ``source`` naming the
proxy; once an SSE answer has started they go out as one ``data:`` event instead, which
OpenAI clients raise as an API error.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Final

from edge_proxy.http_routes.headers import RawHeaders, header
from edge_proxy.http_routes.upstream import Response, read_capped
from shared.http import error_body

if TYPE_CHECKING:  # (the exchange answers with these helpers)
    from edge_proxy.http_routes.exchange import Exchange

# An error answer relayed into an already-started SSE stream is read up to this size.
MAX_ERROR_BODY_BYTES: Final = 64 * 1024

SOURCE: Final = "edge-proxy"

SSE_HEADERS: Final[RawHeaders] = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    # nginx buffers proxied answers unless told not to; comments must reach the client now
    (b"x-accel-buffering", b"no"),
]


def comment(node: str, waited_s: float) -> bytes:
    return f": waking {node} {waited_s:.0f} s\n\n".encode()


def loading_comment(model: str, waited_s: float) -> bytes:
    return f": loading {model} {waited_s:.0f} s\n\n".encode()


def error_json(message: str, kind: str, code: str | None = None) -> bytes:
    body: dict[str, Any] = error_body(message, kind, SOURCE)
    if code is not None:
        body["error"]["code"] = code
    return json.dumps(body).encode()


def error_event(payload: bytes) -> bytes:
    """A JSON error as one SSE ``data:`` event (the payload must be one line of JSON)."""
    return b"data: " + payload.replace(b"\n", b" ") + b"\n\n"


async def continue_after_comments(ex: Exchange, response: Response,
                                  chunks: AsyncIterator[bytes]) -> None:
    """After SSE comments the status is sent: relay an event stream (``chunks``, the
    body as the meter passes it on), or turn any other answer into one error event."""
    content_type = header([(n.lower(), v) for n, v in response.headers], b"content-type") or b""
    if response.status == 200 and content_type.startswith(b"text/event-stream"):
        async for chunk in chunks:
            await ex.body(chunk)
        await ex.end()
        return
    text = await read_capped(response, MAX_ERROR_BODY_BYTES) or b""
    try:
        is_error = isinstance(json.loads(text).get("error"), dict)
    except (ValueError, UnicodeDecodeError, AttributeError):
        is_error = False
    if is_error:
        await ex.end(error_event(text))
    else:
        await ex.fail(502, f"the backend answered {response.status}: "
                      f"{text[:200].decode('utf-8', 'replace')}", "upstream_error")
