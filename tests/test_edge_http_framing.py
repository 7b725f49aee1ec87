"""The chunked-body scanner that follows a passed-through answer (pure)."""

from __future__ import annotations

import itertools

import h11
import pytest

from edge_proxy.http_routes.framing import ChunkedScanner, FramingError


def framed(*chunks: bytes, trailers: bytes = b"") -> bytes:
    """The body as h11 frames it (a real chunked encoder), plus optional trailers."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    conn.next_event()
    conn.send(h11.Response(status_code=200, headers=[]))
    body = b"".join(conn.send(h11.Data(data=c)) or b"" for c in chunks)
    end = conn.send(h11.EndOfMessage()) or b""
    return body + (end[:-2] + trailers + b"\r\n" if trailers else end)


def scan(data: bytes, cuts: list[int]) -> tuple[list[bytes], int | None, int]:
    """Feed ``data`` cut at ``cuts``; the payload seen, where the end was found (offset in
    ``data``), and how many feeds it took."""
    payload: list[bytes] = []
    scanner = ChunkedScanner(payload.append)
    pieces = [data[a:b] for a, b in itertools.pairwise([0, *cuts, len(data)])]
    offset = 0
    for i, piece in enumerate(pieces):
        end = scanner.feed(piece)
        if end is not None:
            assert scanner.done
            return payload, offset + end, i + 1
        offset += len(piece)
    return payload, None, len(pieces)


EVENTS = [b'data: {"choices":[{"delta":{"content":"Good"}}]}\n\n',
          b'data: {"choices":[{"delta":{"content":" morning"}}]}\n\n',
          b"data: [DONE]\n\n"]


def test_the_end_and_the_payload_are_found_in_one_piece() -> None:
    data = framed(*EVENTS)
    payload, end, _ = scan(data + b"GET /next HTTP/1.1\r\n", [])
    assert end == len(data)  # the bytes after the end are not this body's
    assert b"".join(payload) == b"".join(EVENTS)


@pytest.mark.parametrize("step", [1, 2, 3, 7, 50])
def test_any_cut_of_the_bytes_gives_the_same_answer(step: int) -> None:
    data = framed(*EVENTS, b"x" * 300)
    payload, end, feeds = scan(data, list(range(step, len(data), step)))
    assert end == len(data) and feeds == len(range(0, len(data), step))
    assert b"".join(payload) == b"".join(EVENTS) + b"x" * 300


def test_extensions_and_trailers_pass() -> None:
    data = b"5;name=value\r\nhello\r\n0\r\nx-trailer: 1\r\nx-other: 2\r\n\r\n"
    payload, end, _ = scan(data, [3, 20, 31])
    assert b"".join(payload) == b"hello" and end == len(data)
    assert framed(b"abc", trailers=b"x-t: 1\r\n").endswith(b"0\r\nx-t: 1\r\n\r\n")


@pytest.mark.parametrize("data", [b"zz\r\nhello\r\n", b"5\r\nhelloXY0\r\n\r\n",
                                  b"-5\r\nhello\r\n", b"\r\n"])
def test_broken_framing_is_an_error(data: bytes) -> None:
    with pytest.raises(FramingError):
        ChunkedScanner().feed(data)


def test_an_endless_size_line_is_an_error() -> None:
    scanner = ChunkedScanner()
    with pytest.raises(FramingError, match="over 4096 bytes"):
        for _ in range(100):
            scanner.feed(b"0" * 100)


def test_an_unfinished_body_is_not_done() -> None:
    scanner = ChunkedScanner()
    assert scanner.feed(b"5\r\nhel") is None and not scanner.done
    assert scanner.feed(b"lo\r\n0\r\n") is None  # the trailer section has not ended
    assert scanner.feed(b"\r\n") == 2 and scanner.size == 5

