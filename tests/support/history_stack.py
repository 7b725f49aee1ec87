"""A proxy with ``[history]`` on, in front of one node that "wakes" into a real llama-server
on the sentence model: the stack the history and dashboard tests share.

``sentence_stack(tmp_path, binary)`` writes the model and the config, runs the packet
listener, the waker and the proxy, waits until the proxy takes the node for asleep, and
yields them with an HTTP client on the route; leaving it stops them all (the recorder
writes its queue on the way out of the proxy).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import httpx
import trio

from edge_proxy.service import Proxy, serve_proxy
from edge_proxy.wake.machine import State
from shared.config.edge import load_edge_config
from shared.tiny_gguf import PRESETS, write_tiny_model
from tests.support.edge import PacketListener
from tests.support.edge_http import TEST_TIMEOUT_S, NodeSpec, Waker, wait_state, write_http_config
from tests.support.ports import free_port

ALIAS: Final = "sentence"
ARGS: Final = ("-c", "512", "-np", "1", "-t", "1", "--alias", ALIAS)
CHAT: Final = {"model": ALIAS, "messages": [{"role": "user", "content": "hi"}],
               "temperature": 0}


@dataclass(frozen=True)
class SentenceStack:
    """The running proxy, its history database, and a client on its HTTP route."""

    proxy: Proxy
    db: Path
    client: httpx.AsyncClient


def with_history(config: Path, db: Path) -> None:
    """Turn ``[history]`` on in a proxy config ``write_http_config`` wrote, at ``db``."""
    config.write_text(config.read_text() + f'\n[history]\nenabled = true\npath = "{db}"\n')


@asynccontextmanager
async def sentence_stack(tmp_path: Path, binary: Path) -> AsyncIterator[SentenceStack]:
    """The stack, with the node asleep (nothing listens until the first packet)."""
    model = write_tiny_model(tmp_path / "sentence.gguf", PRESETS["llama-sentence"])
    db = tmp_path / "history.sqlite3"
    node = NodeSpec("box", "aa:bb:cc:dd:ee:01", free_port(), models=(ALIAS,))
    packets = await PacketListener.open()
    path = write_http_config(tmp_path, [node], packets.port)
    with_history(path, db)
    waker = Waker(node, binary, model, ARGS)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(packets.run)
            nursery.start_soon(waker.run, packets)
            proxy: Proxy = await nursery.start(serve_proxy, load_edge_config(path))
            async with httpx.AsyncClient(base_url=proxy.http_routes.url("127.0.0.1:0"),
                                         timeout=TEST_TIMEOUT_S) as client:
                await wait_state(proxy, "box", State.ASLEEP)
                yield SentenceStack(proxy, db, client)
            nursery.cancel_scope.cancel()
