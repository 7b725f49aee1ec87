"""What a request must be before the proxy acts on it: a known HTTP version, one framing of
its body, the whole body within the route's size and time limits, and for JSON endpoints a
JSON object. Anything else is answered here (and counted as refused) and never reaches a
node, so a malformed or dripping request cannot wake one or hold a slot forever.

h11 (in ``h1``) parses the request head. It takes any ``HTTP/d.d`` version and, given both
``Content-Length`` and ``Transfer-Encoding``, frames the body by the latter, so those two
checks are made here from the request's scope. Answers to requests refused before their body
was read carry ``Connection: close``: the rest of such a connection cannot be trusted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

from edge_proxy.errors import BodyTooLarge, ClientLeft
from edge_proxy.http_routes.exchange import Exchange
from edge_proxy.http_routes.headers import RawHeaders
from edge_proxy.http_routes.metrics import RefusalReason, Refusals
from edge_proxy.http_routes.models import body_problem
from shared.config.edge import HttpOptions

log = logging.getLogger(__name__)

CLOSE: RawHeaders = [(b"connection", b"close")]


@dataclass(frozen=True)
class Refusal:
    """A request the proxy answers itself: status, reason (a metric label), message."""

    status: int
    reason: RefusalReason
    message: str
    close: bool = True


def head_problem(http_version: str, headers: RawHeaders) -> Refusal | None:
    """A refusal for a request head no node should see (pure)."""
    major = http_version.partition(".")[0]
    if not (major == "1" and len(http_version) == 3):
        return Refusal(505, "http_version", f"HTTP/{http_version} is not supported; "
                       "send HTTP/1.1 (or HTTP/1.0)")
    names = {name.lower() for name, _ in headers}
    if b"content-length" in names and b"transfer-encoding" in names:
        # RFC 9112 §6.1: such a message may be an attempt at request smuggling
        return Refusal(400, "framing", "a request with both Content-Length and "
                       "Transfer-Encoding is refused (RFC 9112 6.1); send only one")
    return None


async def read_request(ex: Exchange, options: HttpOptions, refusals: Refusals,
                       listen: str) -> bytes | None:
    """The request body, or None when the request was answered here (refused, or the
    client left before its body was complete)."""
    head = head_problem(ex.scope.get("http_version", "1.1"), ex.scope["headers"])
    # Even a refused request's body is read (within the limits): the server's reader must be
    # done with it before a ``Connection: close`` answer goes out, or a request pipelined
    # behind it races the close and the answer is lost.
    got = await _read_body(ex, options, listen)
    if got is None:
        return None
    refusal = head or (got if isinstance(got, Refusal) else _json_refusal(ex, got))
    if refusal is None:
        assert isinstance(got, bytes)
        return got
    refusals.refused(refusal.reason, f"{ex.method} {ex.path}: {refusal.message}")
    await ex.fail(refusal.status, refusal.message, "invalid_request_error",
                  headers=CLOSE if refusal.close else None)
    return None


async def _read_body(ex: Exchange, options: HttpOptions, listen: str) -> bytes | Refusal | None:
    """The whole body; a refusal past the size or time limit; None if the client left."""
    try:
        with trio.fail_after(options.request_body_timeout_s):
            return await ex.read_body(options.max_request_bytes)
    except BodyTooLarge as exc:
        return Refusal(413, "too_large", f"{exc}; raise routes.http.max_request_bytes to "
                       "allow it")
    except trio.TooSlowError:
        return Refusal(408, "body_timeout", "the request body was not complete "
                       f"{options.request_body_timeout_s:g} s after its head "
                       "(routes.http.request_body_timeout_s)")
    except ClientLeft as exc:
        log.info("route %s: client left %s", listen, exc)
        return None


def _json_refusal(ex: Exchange, body: bytes) -> Refusal | None:
    problem = body_problem(ex.method, ex.path, body)
    # the body was read whole and is well framed: the connection may carry on
    return None if problem is None else Refusal(400, "bad_request", problem, close=False)
