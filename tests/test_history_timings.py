"""The timings parser: llama-server's own numbers from real responses, split anywhere."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path
from typing import Any, Final

import httpx
import pytest

from edge_proxy.history.timings import MAX_LINE_BYTES, TAIL_BYTES, LlamaNumbers, TimingsParser
from shared.tiny_gguf import PRESETS, write_tiny_model
from tests.support.llama import llama_server

REQUEST_TIMEOUT_S: Final = 60.0
SERVER_ARGS: Final = ("-c", "512", "-np", "1", "-t", "1")
SPLITS_PER_BODY: Final = 30
CHAT: Final = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0}


def _splits(body: bytes, rng: random.Random) -> list[bytes]:
    """``body`` cut at random places, one-byte pieces included."""
    cuts = sorted(rng.sample(range(1, len(body)), k=min(len(body) - 1, rng.randint(1, 60))))
    if rng.random() < 0.3:
        cuts = list(range(1, len(body)))  # every byte on its own
    edges = [0, *cuts, len(body)]
    return [body[a:b] for a, b in itertools.pairwise(edges)]


def _parse(chunks: list[bytes], content_type: str | None) -> LlamaNumbers | None:
    parser = TimingsParser(content_type)
    for chunk in chunks:
        parser.feed(chunk)
        assert parser.held_bytes <= max(TAIL_BYTES, MAX_LINE_BYTES)
    return parser.numbers()


def _expected(timings: dict[str, Any], usage: dict[str, Any] | None) -> LlamaNumbers:
    usage = usage or {}
    return LlamaNumbers(
        prompt_n=timings["prompt_n"], prompt_ms=timings["prompt_ms"],
        prompt_per_second=timings["prompt_per_second"], predicted_n=timings["predicted_n"],
        predicted_ms=timings["predicted_ms"],
        predicted_per_second=timings["predicted_per_second"], cache_n=timings.get("cache_n"),
        prompt_tokens=usage.get("prompt_tokens"),
        completion_tokens=usage.get("completion_tokens"))


def _last_event_with(body: bytes, key: str) -> dict[str, Any]:
    events = [json.loads(line[len(b"data:"):]) for line in body.split(b"\n")
              if line.startswith(b"data:") and line.strip() != b"data: [DONE]"]
    return next(e for e in reversed(events) if key in e)


@pytest.mark.llama
async def test_real_llama_server_bodies_in_random_splits(llama_server_bin: Path,
                                                         tmp_path: Path) -> None:
    model = write_tiny_model(tmp_path / "sentence.gguf", PRESETS["llama-sentence"])
    async with (
        llama_server(llama_server_bin, model, SERVER_ARGS) as server,
        # llama-server closes a connection after a streamed answer; a kept one could be
        # reused just as that close arrives, so every request gets a connection of its own
        httpx.AsyncClient(base_url=server.url, timeout=REQUEST_TIMEOUT_S,
                          limits=httpx.Limits(max_keepalive_connections=0)) as client,
    ):
        bodies: list[tuple[str, bytes, str, LlamaNumbers]] = []
        r = await client.post("/v1/chat/completions", json=CHAT)
        body = r.json()
        bodies.append(("chat", r.content, r.headers["content-type"],
                       _expected(body["timings"], body["usage"])))
        r = await client.post("/v1/chat/completions", json={
            **CHAT, "stream": True, "stream_options": {"include_usage": True}})
        assert r.headers["content-type"].startswith("text/event-stream")
        last = _last_event_with(r.content, "timings")
        bodies.append(("chat stream", r.content, r.headers["content-type"],
                       _expected(last["timings"], last["usage"])))
        r = await client.post("/completion", json={"prompt": "hello " * 40, "top_k": 1})
        bodies.append(("completion", r.content, r.headers["content-type"],
                       _expected(r.json()["timings"], None)))
        r = await client.post("/completion", json={"prompt": "hello", "top_k": 1,
                                                   "stream": True})
        last = _last_event_with(r.content, "timings")
        bodies.append(("completion stream", r.content, r.headers["content-type"],
                       _expected(last["timings"], None)))
    rng = random.Random(7)
    for name, body, content_type, want in bodies:
        assert want.predicted_n == 8, name  # the sentence is 8 tokens
        assert _parse([body], content_type) == want, name
        for _ in range(SPLITS_PER_BODY):
            chunks = _splits(body, rng)
            assert _parse(chunks, content_type) == want, name
            assert _parse(chunks, None) == want, f"{name} (sniffed)"
    chat = bodies[0][3]
    assert chat.prompt_total == chat.prompt_tokens and chat.predicted_total == 8


def test_a_large_json_body_is_not_held() -> None:
    parser = TimingsParser("application/json")
    parser.feed(b'{"content": "' + b"x" * 200_000)
    parser.feed(b'", "timings": {"prompt_n": 3, "predicted_n": 5, "predicted_per_second": 9.5}}')
    assert parser.held_bytes <= TAIL_BYTES
    assert parser.numbers() == LlamaNumbers(prompt_n=3, predicted_n=5, predicted_per_second=9.5)


def test_timings_quoted_inside_content_are_not_taken() -> None:
    text = json.dumps({"content": 'say "timings": {"prompt_n": 666}', "timings": {"prompt_n": 1}})
    assert _parse([text.encode()], None) == LlamaNumbers(prompt_n=1)
    only_quoted = json.dumps({"content": '"timings": {"prompt_n": 666}'})
    assert _parse([only_quoted.encode()], None) is None


def test_an_over_long_sse_line_is_skipped_and_the_stream_goes_on() -> None:
    long_line = b'data: {"choices": [{"delta": {"content": "' + b"y" * (MAX_LINE_BYTES * 2) + \
        b'"}}], "timings": {"prompt_n": 666}}\n\n'
    final = b'data: {"choices": [], "timings": {"prompt_n": 4, "predicted_n": 2}}\r\n\r\n'
    got = _parse([long_line[:1000], long_line[1000:], final, b"data: [DONE]\n\n"],
                 "text/event-stream")
    assert got == LlamaNumbers(prompt_n=4, predicted_n=2)


def test_bodies_without_numbers_give_none() -> None:
    assert _parse([b'{"object": "list", "data": []}'], "application/json") is None
    assert _parse([b"data: {\"choices\": []}\n\n"], "text/event-stream") is None
    assert _parse([b"not json at all"], None) is None
    assert _parse([], None) is None
