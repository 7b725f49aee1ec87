"""Config of HTTP routes, from real TOML files: options, listeners shared by several nodes,
and one-line errors that name the dotted key."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_proxy.http_routes import group_http_routes
from edge_proxy.http_routes.models import backend_keys
from shared.config.edge import DEFAULT_NO_WAKE, HttpOptions, load_edge_config
from shared.errors import ConfigError

NODES = """
[nodes.a]
host = "127.0.0.1"
mac = "aa:bb:cc:dd:ee:0a"
wol = { broadcast = "127.0.0.1" }

[nodes.b]
host = "127.0.0.1"
mac = "aa:bb:cc:dd:ee:0b"
wol = { broadcast = "127.0.0.1" }
"""


def route(node: str, listen: str = "127.0.0.1:8080", protocol: str = "http",
          extra: str = "", port: int = 8080) -> str:
    return (f'\n[[routes]]\nlisten = "{listen}"\nnode = "{node}"\nbackend_port = {port}\n'
            f'protocol = "{protocol}"\n{extra}\n')


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "edge.toml"
    path.write_text(NODES + text)
    return path


def error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_edge_config(_write(tmp_path, text))
    message = str(info.value)
    assert "\n" not in message
    return message.split(": ", 1)[1]  # without the file name


def test_defaults_and_options(tmp_path: Path) -> None:
    cfg = load_edge_config(_write(tmp_path, route("a", extra='models = ["qwen"]\n[routes.http]\n'
                                               'no_wake = ["GET /health", "* /v1/models*"]\n'
                                               "waking_comment_interval_s = 2.5")))
    (r,) = cfg.routes
    assert r.models == ["qwen"]
    assert r.http == HttpOptions(no_wake=["GET /health", "* /v1/models*"],
                                 waking_comment_interval_s=2.5)
    assert HttpOptions().no_wake == list(DEFAULT_NO_WAKE)


def test_http_routes_to_different_nodes_share_a_listener(tmp_path: Path) -> None:
    cfg = load_edge_config(_write(tmp_path, route("a", extra="[routes.http]\nmax_request_bytes = 4096")
                                  + route("b") + route("a", listen="127.0.0.1:8081")))
    groups = group_http_routes(cfg.routes)
    assert [[r.node for r in rs] for rs in groups.values()] == [["a", "b"], ["a"]]


def test_http_routes_to_one_node_on_different_ports_share_a_listener(tmp_path: Path) -> None:
    cfg = load_edge_config(_write(tmp_path, route("a", extra='models = ["chat"]')
                                  + route("a", port=8081, extra='models = ["coder"]')
                                  + route("b")))
    groups = group_http_routes(cfg.routes)
    assert [[(r.node, r.backend_port) for r in rs] for rs in groups.values()] == [
        [("a", 8080), ("a", 8081), ("b", 8080)]]
    assert backend_keys([(r.node, r.backend_port) for r in cfg.routes]) == [
        "a:8080", "a:8081", "b"]


def test_one_node_and_port_twice_on_a_listener_is_refused_naming_both_routes(
        tmp_path: Path) -> None:
    message = error(tmp_path, route("a") + route("a", port=8081) + route("a"))
    assert message.startswith("routes[2].listen: 127.0.0.1:8080 is also routes[0].listen; use "
                              "another port (both go to node a backend_port 8080; ")


def test_on_port_zero_a_repeated_node_gets_a_listener_of_its_own(tmp_path: Path) -> None:
    any_port = "127.0.0.1:0"
    cfg = load_edge_config(_write(tmp_path, route("a", any_port) + route("b", any_port)
                                  + route("a", any_port) + route("a", any_port, protocol="tcp")))
    groups = group_http_routes(cfg.routes)
    assert {key: [r.node for r in rs] for key, rs in groups.items()} == {
        any_port: ["a", "b"], f"{any_port}#1": ["a"]}


@pytest.mark.parametrize("text, expected", [
    (route("a", extra='[routes.http]\nno_wake = ["GET /health", "health"]'),
     "routes[0].http.no_wake[1]: found 'health'; expected \"METHOD /path\""),
    (route("a", extra='[routes.http]\nno_wake = ["get /health"]'),
     "routes[0].http.no_wake[0]: found 'get /health'"),
    (route("a", extra="[routes.http]\nwaking_comment_interval_s = 0"),
     "routes[0].http.waking_comment_interval_s: found 0.0; allowed: between 0.01 and 3600"),
    (route("a", extra="[routes.http]\nstream = true"),
     "routes[0].http.stream: unknown key; allowed here: client_keepalive_s, max_request_bytes"),
    (route("a", protocol="tcp", extra='models = ["qwen"]'),
     'routes[0].models: only for HTTP routes; set protocol = "http"'),
    (route("a", protocol="tcp", extra="[routes.http]"),
     'routes[0].http: only for HTTP routes; set protocol = "http"'),
    (route("a") + route("a"),
     "routes[1].listen: 127.0.0.1:8080 is also routes[0].listen; use another port"),
    (route("a") + route("b", protocol="tcp"),
     "routes[1].listen: 127.0.0.1:8080 is also routes[0].listen; use another port"),
    (route("a", extra="[routes.http]\nclient_keepalive_s = 5")
     + route("b", extra="[routes.http]\nclient_keepalive_s = 6"),
     "routes[1].http: differs from routes[0].http on the same listener; set it on one of them"),
])
def test_errors_name_the_dotted_key(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in error(tmp_path, text)
