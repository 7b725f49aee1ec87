"""Passing a chunked answer to the client as the backend framed it.

A streamed completion is hundreds of small chunks. Decoding each (h11) and framing it anew
for the client costs the proxy more than the read and the write; the framing is the same on
both sides (HTTP/1.1, chunked), so the bytes go on as they came: the head is answered
through h11, then the body's raw bytes are handed to the relay loop (``RelayLoop.
pass_answer``), which writes each read once. A ``ChunkedScanner`` reads the framing beside
them, in the loop's thread: where the answer ends (so the client's connection stays usable
for its next request) and its payload, for the history row and the model metrics. Without
the loop (it failed, or a test runs none) trio passes the same raw bytes.
"""

from __future__ import annotations

import math
import time

import trio

from edge_proxy.errors import ClientLeft, LoopStopped, UpstreamError
from edge_proxy.history.hooks import RequestLog
from edge_proxy.history.timings import TimingsParser
from edge_proxy.http_routes.exchange import Exchange
from edge_proxy.http_routes.framing import ChunkedScanner, FramingError
from edge_proxy.http_routes.headers import RawHeaders, header
from edge_proxy.http_routes.model_metrics import SSE_CONTENT_TYPE, ResponseMeter
from edge_proxy.http_routes.upstream import READ_BYTES, Response, upstream_timeout
from edge_proxy.tcp_routes.idle import IdleTimeouts
from edge_proxy.tcp_routes.relay_loop import RelayLoop
from edge_proxy.tcp_routes.relay_thread import CLIENT_GONE

_NO_BODY_STATUS = (204, 304)


def passable(ex: Exchange, response: Response, out: RawHeaders) -> bool:
    """True when ``response``'s body can go to ``ex``'s client as it was framed: chunked
    both ways (an HTTP/1.1 client), a body to send, and, once SSE comments started the
    answer, an event stream to continue it."""
    if not (response.chunked and ex.client.http_11) or ex.method == "HEAD" \
            or response.status in _NO_BODY_STATUS or response.status < 200:
        return False
    if ex.started:
        return response.status == 200 and (header(out, b"content-type") or b"").startswith(
            SSE_CONTENT_TYPE)
    return True


class PayloadTap:
    """Told each piece of payload (in the loop's thread while the loop passes the answer):
    notes when the first arrived, feeds the history row and the meter's parser."""

    def __init__(self, log: RequestLog | None, parser: TimingsParser | None) -> None:
        self.first_at: float | None = None  # time.perf_counter()
        self._log = log
        self._parser = parser

    def __call__(self, payload: bytes) -> None:
        if self.first_at is None and payload:
            self.first_at = time.perf_counter()
        if self._log is not None:
            self._log.body(payload)
        if self._parser is not None:
            self._parser.feed(payload)


async def pass_through(ex: Exchange, response: Response, out: RawHeaders,
                       meter: ResponseMeter | None, loop: RelayLoop | None,
                       idle_timeout_s: float) -> None:
    """Send the answer (head, unless SSE comments sent it) and pass its body through;
    raises ``UpstreamError`` (``UpstreamTimeout``) when the backend breaks off, leaving the
    answer cut."""
    content_type = header(out, b"content-type")
    numbers = None if ex.log is None else ex.log.numbers
    parser = None if meter is None else meter.parser(response.status, content_type, numbers)
    tap = PayloadTap(ex.log, parser)
    scanner = ex.passing = ChunkedScanner(tap)
    offset = trio.current_time() - time.perf_counter()  # the loop's clock to trio's
    head = [h for h in out if h[0] != b"content-length"]
    if not ex.started:
        ex.answer_coming(response.status, head)  # the row reads what the scan finds
    start = response.raw_start
    end = _scan(scanner, start, response)
    if end is not None:
        start = start[:end]
    if ex.started:
        await ex.body_raw(start)
    else:
        await ex.start_raw(response.status, head, start)
    if end is None:
        await _pass_rest(ex, response, scanner, loop, idle_timeout_s)
    ex.passed_through()
    if meter is not None:
        if tap.first_at is not None:
            meter.first_byte(tap.first_at + offset, response.status, content_type)
        meter.ended(response.status, numbers() if numbers is not None
                    else None if parser is None else parser.numbers())


async def _pass_rest(ex: Exchange, response: Response, scanner: ChunkedScanner,
                     loop: RelayLoop | None, idle_timeout_s: float) -> None:
    where = f"{response.name}: "
    if loop is not None and loop.running:
        idle = None if math.isinf(idle_timeout_s) else IdleTimeouts(idle_timeout_s,
                                                                     idle_timeout_s)
        try:
            outcome = await loop.pass_answer(ex.client.stream, response.stream, scanner.feed,
                                             idle)
        except LoopStopped:
            pass  # it stopped before taking the answer: trio passes it
        else:
            if outcome == "done":
                return
            if outcome.startswith("idle"):
                raise upstream_timeout(response.name, idle_timeout_s)
            if outcome.startswith(CLIENT_GONE):
                raise ClientLeft(f"while the answer was passed on: {outcome}")
            raise UpstreamError(where + outcome)
    stream = response.stream
    while True:
        with trio.move_on_after(idle_timeout_s) as waited:
            try:
                data = await stream.receive_some(READ_BYTES)
            except (trio.BrokenResourceError, OSError) as exc:
                raise UpstreamError(f"{where}{exc!r}") from exc
        if waited.cancelled_caught:
            raise upstream_timeout(response.name, idle_timeout_s)
        if not data:
            raise UpstreamError(f"{where}closed its connection before the end of the answer")
        end = _scan(scanner, data, response)
        await ex.body_raw(data if end is None else data[:end])
        if end is not None:
            return


def _scan(scanner: ChunkedScanner, data: bytes, response: Response) -> int | None:
    try:
        return scanner.feed(data)
    except FramingError as exc:
        raise UpstreamError(f"{response.name}: the answer's framing is broken: {exc}") from exc
