"""An instance's name is its model's name: the structured form starts llama-server with
``--alias NAME`` (unless its args give one), so ``/v1/models`` lists the name frontends send
back as ``model``, not the file's path, and the proxy's model table holds the same names.

Real llama-server on a tiny model, supervised by the real supervisor; a real proxy in front.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import trio

from edge_proxy.service import Proxy, serve_proxy
from edge_proxy.wake.machine import State as NodeState
from inference_node.supervisor import State, Supervisor
from shared.config.edge import load_edge_config
from tests.support.edge_http import (
    SERVER_ARGS,
    TEST_TIMEOUT_S,
    NodeSpec,
    wait_state,
    write_http_config,
)
from tests.support.ports import free_port
from tests.support.supervised import instance
from tests.support.supervised import wait_state as wait_instance


def model_ids(answer: httpx.Response) -> list[str]:
    assert answer.status_code == 200, answer.text
    return [m["id"] for m in answer.json()["data"]]


pytestmark = pytest.mark.llama


async def test_v1_models_lists_the_instance_name_or_the_alias_in_its_args(
        nursery: trio.Nursery, tmp_path: Path, llama_server_bin: Path, tiny_model: Path) -> None:
    sup = Supervisor()
    await nursery.start(sup.run)
    source = tmp_path / "instances.toml"
    ports = {"qwen": free_port(), "own": free_port()}
    base = {"binary": str(llama_server_bin), "model": str(tiny_model), "args": list(SERVER_ARGS)}
    await sup.apply({
        "qwen": instance("qwen", base | {"port": ports["qwen"]}, source),
        "own": instance("own", base | {"port": ports["own"],
                                       "args": [*SERVER_ARGS, "-a", "custom-name"]}, source),
    }, {})
    for name in ports:
        await wait_instance(sup, name, State.READY)
    async with httpx.AsyncClient(timeout=TEST_TIMEOUT_S) as client:
        listed = {name: model_ids(await client.get(f"http://127.0.0.1:{port}/v1/models"))
                  for name, port in ports.items()}
        assert listed == {"qwen": ["qwen"], "own": ["custom-name"]}

        # the proxy in front: its list is the node's one name (the route's models = ["qwen"]
        # and what it learns are the same), and a request for it is answered under that name
        node = NodeSpec("box", "aa:bb:cc:dd:ee:01", ports["qwen"], ("qwen",))
        proxy: Proxy = await nursery.start(
            serve_proxy, load_edge_config(write_http_config(tmp_path, [node], free_port())))
        with trio.fail_after(TEST_TIMEOUT_S):
            await wait_state(proxy, "box", NodeState.AWAKE)
        url = proxy.http_routes.url("127.0.0.1:0")
        assert model_ids(await client.get(f"{url}/v1/models")) == ["qwen"]
        answer = await client.post(f"{url}/v1/chat/completions", json={
            "model": "qwen", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == "qwen"
