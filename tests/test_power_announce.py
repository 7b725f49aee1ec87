"""The models an agent reports (to proxies old and new), and connections from the proxy that
are not use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psutil
import pytest
import trio
from psutil import _ntuples as ntuples

from inference_node.errors import ProxyUnreachable
from inference_node.power.announce import served_models
from inference_node.power.checks import connection_reason
from inference_node.power.proxy_addresses import ProxyAddresses, proxy_hosts
from inference_node.power.proxy_client import ProxyClient
from shared.config.node import ProxySection, load_node_config
from shared.config.values import HostPort
from shared.events import EVENTS_PATH, EventReply
from shared.http import App, HTTPError, Request, Response, serve

CONFIG = """
[agent]
state_file = "{folder}/state.toml"
[proxy]
url = "http://10.201.0.2:9180"
[instances.qwen]
model = "/models/qwen.gguf"
port = 8080
[instances.named]
model = "/models/x.gguf"
port = 8081
args = ["--alias", "x-chat"]
[instances.raw]
command = ["llama-server", "-m", "/models/raw.gguf", "--port", "8082"]
[instances.other]
command = ["python3", "-m", "http.server", "8083"]
port = 8083
[instances.lazy]
model = "/models/lazy.gguf"
port = 8085
load = "on-demand"
models = ["lazy-a", "lazy-b"]
[instances.two]
model = "/models/two.gguf"
port = 8086
args = ["-a", "two-a,two-b"]
[instances.off]
model = "/models/off.gguf"
port = 8084
enabled = false
"""


def test_served_models_are_the_ids_llama_server_lists(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(CONFIG.format(folder=tmp_path))
    cfg = load_node_config(path)
    enabled = [n for n, i in cfg.instances.items() if i.enabled]
    assert served_models(cfg.instances, enabled) == (
        "qwen", "x-chat", "/models/raw.gguf", "lazy-a", "lazy-b", "two-a", "two-b")
    assert proxy_hosts(cfg) == ["10.201.0.2"]


def conn(laddr: tuple[str, int], raddr: tuple[str, int], pid: int | None) -> Any:
    """A row as psutil.net_connections gives it (its own named tuples)."""
    return ntuples.sconn(6, 1, 1, ntuples.addr(*laddr), ntuples.addr(*raddr),
                         psutil.CONN_ESTABLISHED, pid)


def test_connections_from_the_proxy_are_not_use() -> None:
    probe = conn(("10.201.0.1", 8080), ("10.201.0.2", 40000), 7)
    client = conn(("10.201.0.1", 8080), ("10.201.0.9", 40001), 7)
    mapped = conn(("::ffff:10.201.0.1", 8080), ("::ffff:10.201.0.2", 40002), 7)
    # without the proxy's address, its probe counts (the suspend-sequence veto it caused)
    assert connection_reason([probe], {8080}, 1) == "client connections open: port 8080: 1 from 10.201.0.2"
    assert connection_reason([probe, mapped], {8080}, 1, {"10.201.0.2"}) is None
    assert connection_reason([probe, client], {8080}, 1, {"10.201.0.2"}) == \
        "client connections open: port 8080: 1 from 10.201.0.9"


async def test_proxy_addresses_resolve_literals_and_names() -> None:
    assert await ProxyAddresses(["10.0.0.2", "[::1]"]).resolve() == {"10.0.0.2", "::1"}
    assert "127.0.0.1" in await ProxyAddresses(["localhost"]).resolve()
    with trio.fail_after(10):
        assert await ProxyAddresses(["no-such-host.invalid"]).resolve() == set()


async def test_a_proxy_that_does_not_take_model_lists_still_gets_the_events() -> None:
    # A proxy from before the models field: it refuses unknown fields, as decode_event did.
    seen: list[dict[str, Any]] = []
    app = App("old-proxy", None)

    @app.route("POST", EVENTS_PATH)
    async def event(req: Request) -> Response:
        body = req.json()
        if "models" in body:
            raise HTTPError(400, "bad event: models: unknown field; allowed: event, node, reason")
        seen.append(body)
        return Response(200, EventReply(body["node"], True, "AWAKE", 0, 0).encode())

    async with trio.open_nursery() as nursery:
        urls = await nursery.start(serve, app, HostPort("127.0.0.1", 0))
        client = ProxyClient(ProxySection(url=urls[0]), "box", lambda: ["qwen"])
        try:
            assert (await client.send("ready", "qwen READY")).allowed
            assert (await client.send("resumed", "again")).allowed
        finally:
            await client.aclose()
        nursery.cancel_scope.cancel()
    assert [e["event"] for e in seen] == ["ready", "resumed"]
    assert client.models is None and client.sent_models is None  # it stopped trying


async def test_a_proxy_without_the_unloading_event_keeps_getting_model_lists() -> None:
    # A proxy that takes model lists but not the unloading event: its 400 lists "models"
    # among the fields it allows, which must not read as a refusal of model lists.
    seen: list[dict[str, Any]] = []
    app = App("older-proxy", None)

    @app.route("POST", EVENTS_PATH)
    async def event(req: Request) -> Response:
        body = req.json()
        if "unloading" in body:
            raise HTTPError(400, "bad event: unloading: unknown field; allowed: event, "
                            "models, node, reason")
        seen.append(body)
        return Response(200, EventReply(body["node"], True, "AWAKE", 0, 0).encode())

    async with trio.open_nursery() as nursery:
        urls = await nursery.start(serve, app, HostPort("127.0.0.1", 0))
        client = ProxyClient(ProxySection(url=urls[0]), "box", lambda: ["qwen"])
        try:
            with pytest.raises(ProxyUnreachable, match="answered 400"):
                await client.send("unloading", "idle for ttl 600 s", unloading=("inst-a",))
            assert (await client.send("ready", "qwen READY")).allowed
        finally:
            await client.aclose()
        nursery.cancel_scope.cancel()
    assert [(e["event"], e["models"]) for e in seen] == [("ready", ["qwen"])]
    assert client.models is not None and client.sent_models == ("qwen",)
