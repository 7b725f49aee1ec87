"""Per-model numbers of HTTP-aware routes: time to first token, generation speed, outcomes.

``model`` is the routing label (``models.Routed.model``: a model the node is known to serve,
``none`` or ``other``), never a raw client string, so a client cannot grow the label set.

- ``edge_http_time_to_first_token_seconds{node,model}``: for a streamed answer (SSE) to a
  request that may wake its node, from the request sent to the node to the first body bytes
  of a 200 answer. Time held while the node woke is not in it (``edge_wake_duration_seconds``
  has that), so it shows the model's own latency.
- ``edge_http_tokens_per_second{node,model}``: generation speed as llama-server reports it
  (``timings.predicted_per_second``), when the answer carries its numbers.
- ``edge_http_model_requests_total{node,model,outcome}``: requests by how they ended (the
  outcomes of ``edge_http_requests``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Final

import trio
from prometheus_client import CollectorRegistry, Counter, Histogram

from edge_proxy.history.timings import LlamaNumbers, TimingsParser

# A small model on a GPU answers in tens of ms; a big prompt on a CPU takes minutes.
TTFT_BUCKETS_S: Final = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
# From a 70B model on old cards to a tiny one on a fast GPU.
TOKENS_PER_S_BUCKETS: Final = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 50.0, 75.0, 100.0, 150.0,
                               200.0, 300.0, 500.0, 1000.0)
SSE_CONTENT_TYPE: Final = b"text/event-stream"


class ModelMetrics:
    """The per-model series, in the proxy's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.ttft = Histogram("edge_http_time_to_first_token_seconds",
                              "Streamed answers: from the request sent to the node to the first "
                              "body bytes (hold time excluded)", ["node", "model"],
                              buckets=TTFT_BUCKETS_S, registry=r)
        self.tokens_per_s = Histogram("edge_http_tokens_per_second",
                                      "Generation speed llama-server reported "
                                      "(timings.predicted_per_second)", ["node", "model"],
                                      buckets=TOKENS_PER_S_BUCKETS, registry=r)
        self.requests = Counter("edge_http_model_requests", "HTTP requests by node, model and "
                                "how they ended", ["node", "model", "outcome"], registry=r)

    def meter(self, node: str, model: str, *, streamed: bool,
              clock: Callable[[], float] = trio.current_time) -> ResponseMeter:
        """A meter for one answer whose request is being sent now."""
        return ResponseMeter(self, node, model, clock(), streamed=streamed, clock=clock)


class ResponseMeter:
    """Watches one answer's body go past: its first bytes (TTFT), llama-server's numbers."""

    def __init__(self, metrics: ModelMetrics, node: str, model: str, sent_at: float, *,
                 streamed: bool, clock: Callable[[], float]) -> None:
        self.metrics = metrics
        self.node = node
        self.model = model
        self.sent_at = sent_at
        self.streamed = streamed
        self.clock = clock
        self.first_byte_s: float | None = None
        self.predicted_per_second: float | None = None

    def parser(self, status: int, content_type: bytes | None,
               numbers: Callable[[], LlamaNumbers | None] | None) -> TimingsParser | None:
        """Where the meter reads llama-server's numbers itself: a 200 answer whose numbers
        nobody else reads (``numbers`` None: no history row)."""
        if status != 200 or numbers is not None:
            return None
        return TimingsParser(None if content_type is None else content_type.decode("latin-1"))

    def first_byte(self, at: float, status: int, content_type: bytes | None) -> None:
        """The answer's first body bytes passed at ``at`` (the meter's clock); a streamed
        200 answer is timed."""
        if self.first_byte_s is not None:
            return
        self.first_byte_s = at - self.sent_at
        if status == 200 and self.streamed and (content_type or b"").startswith(
                SSE_CONTENT_TYPE):
            self.metrics.ttft.labels(self.node, self.model).observe(self.first_byte_s)

    def ended(self, status: int, found: LlamaNumbers | None) -> None:
        """The answer is complete; ``found``: llama-server's numbers in it."""
        rate = None if found is None or status != 200 else found.predicted_per_second
        if rate is not None and rate > 0:
            self.predicted_per_second = rate
            self.metrics.tokens_per_s.labels(self.node, self.model).observe(rate)

    async def watch(self, status: int, content_type: bytes | None,
                    chunks: AsyncIterator[bytes],
                    numbers: Callable[[], LlamaNumbers | None] | None = None
                    ) -> AsyncIterator[bytes]:
        """``chunks`` unchanged; a 200 answer is timed (SSE only) and read for llama-server's
        numbers as it passes (``history.timings``: never the whole body). ``numbers``: where
        they are read already (the request's history row, fed the same chunks); without it
        the meter reads them itself."""
        parser = self.parser(status, content_type, numbers)
        async for chunk in chunks:
            if self.first_byte_s is None and chunk:
                self.first_byte(self.clock(), status, content_type)
            if parser is not None:
                parser.feed(chunk)
            yield chunk
        self.ended(status, numbers() if numbers is not None
                   else None if parser is None else parser.numbers())
