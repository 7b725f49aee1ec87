"""The pure parts of HTTP routes: no-wake rules, the poll cache, model routing, hop-by-hop
headers. Time is passed in; no I/O."""

from __future__ import annotations

import json

import pytest

from edge_proxy.errors import RuleError
from edge_proxy.http_routes.cache import (
    CACHED_FROM_HEADER,
    MAX_CACHED_BODY_BYTES,
    MAX_ENTRIES_PER_NODE,
    ResponseCache,
    cache_key,
)
from edge_proxy.http_routes.headers import request_headers, response_headers
from edge_proxy.http_routes.models import (
    ModelTable,
    Routed,
    Unroutable,
    model_ids,
    requested_model,
    wants_stream,
)
from edge_proxy.http_routes.rules import WakePolicy, default_policy, parse_rule

# ---- rules ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method, path", [
    ("GET", "/v1/models"), ("GET", "/models"), ("GET", "/health"), ("GET", "/props"),
    ("GET", "/api/tags"), ("GET", "/slots"), ("GET", "/metrics"),
])
def test_default_polls_do_not_wake(method: str, path: str) -> None:
    assert not default_policy().may_wake(method, path)


@pytest.mark.parametrize("method, path", [
    ("POST", "/v1/chat/completions"), ("POST", "/v1/models"), ("GET", "/v1/models/x"),
    ("GET", "/"), ("GET", "/healthz"), ("POST", "/completion"),
])
def test_everything_else_wakes(method: str, path: str) -> None:
    assert default_policy().may_wake(method, path)


def test_globs_and_any_method() -> None:
    policy = WakePolicy.from_texts(["GET /v1/models*", "* /status"])
    assert not policy.may_wake("GET", "/v1/models/qwen")
    assert not policy.may_wake("HEAD", "/status")
    assert policy.may_wake("POST", "/v1/models/qwen")
    assert policy.may_wake("GET", "/status/x")
    assert str(policy.rule_for("DELETE", "/status")) == "* /status"
    # regex characters in a path are literal
    assert WakePolicy.from_texts(["GET /a.b"]).may_wake("GET", "/aXb")


def test_a_cors_preflight_goes_by_the_method_it_asks_about() -> None:
    policy = default_policy()
    assert not policy.may_wake("OPTIONS", "/v1/models", preflight_for="GET")
    assert not policy.may_wake("OPTIONS", "/health", preflight_for="get")
    assert policy.may_wake("OPTIONS", "/v1/chat/completions", preflight_for="POST")
    assert policy.may_wake("OPTIONS", "/v1/models")  # not a preflight
    assert policy.may_wake("GET", "/v1/chat/completions", preflight_for="GET")


@pytest.mark.parametrize("text, problem", [
    ("/health", "METHOD /path"), ("get /health", "upper-case"), ("GET health", "starts with /"),
    ("GET /a /b", "METHOD /path"),
])
def test_bad_rules_say_what_is_wrong(text: str, problem: str) -> None:
    with pytest.raises(RuleError, match=problem):
        parse_rule(text)


# ---- cache ---------------------------------------------------------------------------------

HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"2"),
           (b"date", b"Sun, 22 Nov 2026 05:00:00 GMT")]


def test_a_good_answer_is_replayed_with_its_age_and_origin() -> None:
    cache = ResponseCache()
    key = cache_key("GET", "/v1/models", b"")
    assert cache.store("box", key, 200, HEADERS, b"{}", now=100.0)
    hit = cache.lookup("box", key)
    assert hit is not None and hit.body == b"{}"
    headers = dict(hit.replay_headers("box", now=142.7))
    assert headers[b"age"] == b"42"
    assert headers[CACHED_FROM_HEADER] == b"box"
    assert headers[b"content-type"] == b"application/json"
    assert b"content-length" not in headers and b"date" not in headers  # per transfer
    assert cache.lookup("other", key) is None
    assert cache.lookup("box", cache_key("GET", "/v1/models", b"x=1")) is None


def test_errors_and_big_answers_keep_the_last_good_one() -> None:
    cache = ResponseCache()
    key = cache_key("GET", "/health", b"")
    cache.store("box", key, 200, HEADERS, b"ok", now=1.0)
    assert not cache.store("box", key, 503, HEADERS, b"loading", now=2.0)
    assert not cache.store("box", key, 200, HEADERS, b"x" * (MAX_CACHED_BODY_BYTES + 1), now=3.0)
    hit = cache.lookup("box", key)
    assert hit is not None and (hit.body, hit.stored_at) == (b"ok", 1.0)


def test_entries_per_node_are_bounded_newest_kept() -> None:
    cache = ResponseCache()
    for i in range(MAX_ENTRIES_PER_NODE + 10):
        cache.store("box", f"GET /p{i}", 200, [], b"", now=float(i))
    assert cache.lookup("box", "GET /p0") is None
    assert cache.lookup("box", f"GET /p{MAX_ENTRIES_PER_NODE + 9}") is not None


# ---- models --------------------------------------------------------------------------------

LLAMA_MODELS = json.dumps({
    "models": [{"name": "qwen", "model": "qwen"}],
    "object": "list",
    "data": [{"id": "qwen", "object": "model", "owned_by": "llamacpp", "created": 1}],
}).encode()


def test_model_ids_from_openai_and_ollama_lists() -> None:
    assert model_ids(LLAMA_MODELS) == ["qwen"]
    assert model_ids(b'{"models": [{"name": "llama3:8b"}]}') == ["llama3:8b"]
    assert model_ids(b"not json") == [] and model_ids(b"[1]") == []


def test_request_fields() -> None:
    assert requested_model(b'{"model": "qwen", "stream": true}') == "qwen"
    assert requested_model(b'{"model": 3}') is None
    assert requested_model(b"") is None and requested_model(b"model=qwen") is None
    assert wants_stream(b'{"stream": true}')
    assert not wants_stream(b'{"stream": false}') and not wants_stream(b'{"x": "\\"stream\\""}')


def awake_set(*names: str) -> object:
    return lambda node: node in names


def test_one_node_serves_whatever_is_asked() -> None:
    table = ModelTable(("box",), {"box": ("qwen",)})
    assert table.route("qwen", awake_set()) == Routed("box", "qwen")
    assert table.route("anything", awake_set()) == Routed("box", "other")
    assert table.route(None, awake_set()) == Routed("box", "other")


def test_several_nodes_route_by_model_config_then_learned() -> None:
    table = ModelTable(("a", "b"), {"a": ("alpha",), "b": ("beta",)})
    assert table.route("beta", awake_set()) == Routed("b", "beta")
    assert table.route(None, awake_set()) == Routed("a", "none")
    missing = table.route("gamma", awake_set())
    assert isinstance(missing, Unroutable) and missing.status == 404
    assert missing.code == "model_not_found" and "alpha, beta" in missing.message
    table.learn("b", LLAMA_MODELS)
    assert table.route("qwen", awake_set()) == Routed("b", "qwen")
    assert table.served_by("b") == ("beta", "qwen")
    table.learn("b", b"garbage")  # a bad answer forgets nothing
    assert table.served_by("b") == ("beta", "qwen")


def test_an_awake_node_is_preferred_for_a_shared_model() -> None:
    table = ModelTable(("a", "b"), {"a": ("qwen",), "b": ("qwen",)})
    assert table.route("qwen", awake_set()) == Routed("a", "qwen")
    assert table.route("qwen", awake_set("b")) == Routed("b", "qwen")


def test_the_union_lists_live_entries_then_config_ones_once() -> None:
    table = ModelTable(("a", "b"), {"a": ("alpha",), "b": ("beta", "qwen")})
    union = table.union({"a": LLAMA_MODELS, "b": None})
    assert [m["id"] for m in union["data"]] == ["qwen", "alpha", "beta"]
    assert union["data"][0]["owned_by"] == "llamacpp"  # the live entry wins over config
    assert union["data"][1]["owned_by"] == "llamanap"
    assert union["object"] == "list"


# ---- headers -------------------------------------------------------------------------------


def test_hop_by_hop_headers_stop_at_the_proxy() -> None:
    sent = [(b"Host", b"proxy:8080"), (b"Connection", b"keep-alive, X-Secret-Hop"),
            (b"Keep-Alive", b"timeout=5"), (b"X-Secret-Hop", b"1"), (b"TE", b"trailers"),
            (b"Content-Length", b"12"), (b"Authorization", b"Bearer k"),
            (b"Accept-Encoding", b"gzip"), (b"X-Forwarded-For", b"10.0.0.9"),
            (b"Expect", b"100-continue")]
    out = request_headers(sent, "10.0.0.7", b"proxy:8080", "http")
    names = [n for n, _ in out]
    for gone in (b"host", b"connection", b"keep-alive", b"x-secret-hop", b"te", b"content-length",
                 b"expect"):
        assert gone not in names
    assert (b"authorization", b"Bearer k") in out and (b"accept-encoding", b"gzip") in out
    assert (b"x-forwarded-for", b"10.0.0.9, 10.0.0.7") in out
    assert (b"x-forwarded-host", b"proxy:8080") in out and (b"x-forwarded-proto", b"http") in out
    assert (b"via", b"1.1 llamanap") in out


def test_response_headers_keep_encoding_and_length() -> None:
    got = response_headers([(b"Transfer-Encoding", b"chunked"), (b"Content-Encoding", b"gzip"),
                            (b"Content-Length", b"10"), (b"Server", b"llama.cpp"),
                            (b"Date", b"x"), (b"Content-Type", b"text/event-stream")])
    assert got == [(b"content-encoding", b"gzip"), (b"content-length", b"10"),
                   (b"content-type", b"text/event-stream")]
