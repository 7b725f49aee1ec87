"""A backend's answer head, read by hand, and the request head written for it.

h11 framed the proxy's requests to its backends and parsed their answers. Per request that
was about 0.2 ms of the proxy's time before the answer's head reached the client (a 2-core
box, one request at a time): the request's event and its headers validated once more (they
came from the client through h11 already), the answer's head run through its state machine.
The proxy needs less than h11 gives: the status, the headers, how the body is framed and
whether the connection can carry another request. RFC 9112 says how; what is not HTTP a
llama-server (or any sane server) writes is refused as ``AnswerHeadError``, the backend's
fault. Pure: no I/O.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Final

from edge_proxy.http_routes.headers import RawHeaders

# The status line, as RFC 9112 4 has it (the reason may be empty; some servers leave out
# the space before an empty one, and h11 took that too).
_STATUS_LINE: Final = re.compile(rb"HTTP/(\d)\.(\d) (\d{3})(?: ([^\x00-\x08\x0a-\x1f\x7f]*))?")
# A field name is a token (RFC 9110 5.1).
_TOKEN: Final = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
_BAD_VALUE: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_NO_BODY_STATUS: Final = frozenset({204, 304})


class AnswerHeadError(ValueError):
    """The backend's answer head is not HTTP/1.x as RFC 9112 frames it (its fault)."""


class Framing(enum.Enum):
    """How an answer's body is delimited (RFC 9112 6.3)."""

    NONE = "none"  # no body: HEAD, 1xx, 204, 304
    LENGTH = "length"  # Content-Length bytes
    CHUNKED = "chunked"  # Transfer-Encoding ending in chunked
    CLOSE = "close"  # until the backend closes the connection


@dataclass(frozen=True)
class AnswerHead:
    status: int
    headers: RawHeaders  # as sent: names as the backend spelled them
    framing: Framing
    length: int = 0  # for Framing.LENGTH
    keep_alive: bool = True  # the connection may carry another request after this answer

    @property
    def informational(self) -> bool:
        """A 1xx interim answer: the real one follows on the same connection."""
        return 100 <= self.status < 200


def parse_answer_head(head: bytes, method: str) -> AnswerHead:
    """The head (the bytes up to and including the blank line) of the answer to a ``method``
    request. Raises ``AnswerHeadError``."""
    lines = head.split(b"\n")
    if lines[-1] or lines[-2].rstrip(b"\r"):
        raise AnswerHeadError("the answer head does not end with a blank line")
    status_line = lines[0].rstrip(b"\r")
    match = _STATUS_LINE.fullmatch(status_line)
    if match is None:
        raise AnswerHeadError(f"not an HTTP/1.x status line: {status_line[:60]!r}")
    major, minor, code = int(match[1]), int(match[2]), int(match[3])
    if major != 1:
        raise AnswerHeadError(f"HTTP/{major}.{minor} is not HTTP/1.x")
    headers: RawHeaders = []
    lengths: set[bytes] = set()
    codings: list[bytes] = []
    close = minor == 0
    for raw in lines[1:-2]:
        line = raw.rstrip(b"\r")
        if line[:1] in (b" ", b"\t"):
            raise AnswerHeadError("a header folded over lines (obsolete line folding)")
        name, colon, value = line.partition(b":")
        if not colon or _TOKEN.fullmatch(name) is None:
            raise AnswerHeadError(f"a bad header line: {line[:60]!r}")
        value = value.strip(b" \t")
        if _BAD_VALUE.search(value):
            raise AnswerHeadError(f"a control character in header {name.decode()!r}")
        headers.append((name, value))
        lower = name.lower()
        if lower == b"content-length":
            lengths.update(v.strip(b" \t") for v in value.split(b","))
        elif lower == b"transfer-encoding":
            codings.extend(c.strip(b" \t").lower() for c in value.split(b","))
        elif lower == b"connection":
            tokens = {t.strip(b" \t").lower() for t in value.split(b",")}
            close = b"close" in tokens or (close and b"keep-alive" not in tokens)
    if 100 <= code < 200:
        if code == 101:
            raise AnswerHeadError("101 Switching Protocols to a request that asked for none")
        return AnswerHead(code, headers, Framing.NONE)
    if method == "HEAD" or code in _NO_BODY_STATUS:
        return AnswerHead(code, headers, Framing.NONE, keep_alive=not close)
    if codings:
        if lengths:
            raise AnswerHeadError("both Transfer-Encoding and Content-Length (RFC 9112 6.3)")
        if codings[-1] == b"chunked":
            return AnswerHead(code, headers, Framing.CHUNKED, keep_alive=not close)
        return AnswerHead(code, headers, Framing.CLOSE, keep_alive=False)
    if lengths:
        (length,) = lengths if len(lengths) == 1 else (b"",)
        if not length.isdigit() or len(length) > 18:
            raise AnswerHeadError(f"a bad Content-Length {b','.join(sorted(lengths))[:40]!r}")
        return AnswerHead(code, headers, Framing.LENGTH, int(length), keep_alive=not close)
    return AnswerHead(code, headers, Framing.CLOSE, keep_alive=False)


def request_head(method: str, target: bytes, headers: RawHeaders) -> bytes:
    """The request line and headers (and the blank line). ``target`` and the headers come
    from a request h11 parsed (or from the proxy itself): this checks only what would split
    the head, a CR or LF, and raises ``ValueError`` for one."""
    parts = [method.encode("ascii"), b" ", target, b" HTTP/1.1\r\n"]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    head = b"".join(parts)
    if head.count(b"\n") != len(headers) + 2 or head.count(b"\r") != len(headers) + 2:
        raise ValueError("a CR or LF inside the request line or a header")
    return head
