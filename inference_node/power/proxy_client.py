"""The agent's side of the event protocol: tell the edge proxy what the node is doing."""

from __future__ import annotations

import logging

import httpx

from inference_node.errors import ProxyUnreachable
from shared.config.node import ProxySection
from shared.events import EVENTS_PATH, EventError, EventKind, EventReply, NodeEvent, decode_reply

log = logging.getLogger(__name__)


class ProxyClient:
    """Sends ``suspending`` / ``resumed`` / ``ready`` for one node to the configured proxy."""

    def __init__(self, cfg: ProxySection, node: str) -> None:
        self.cfg = cfg
        self.node = node
        self.url = cfg.url.rstrip("/") + EVENTS_PATH
        # Made once, here: building a client (its TLS context) takes ~30 ms of CPU that would
        # otherwise stall the event loop on every event, on the wake path. No kept-alive
        # connections: one would not survive the machine's sleep.
        self._client = httpx.AsyncClient(timeout=cfg.timeout_s,
                                         limits=httpx.Limits(max_keepalive_connections=0))

    async def aclose(self) -> None:
        await self._client.aclose()

    async def send(self, event: EventKind, reason: str) -> EventReply:
        """POST one event; raise ``ProxyUnreachable`` (one line) when there is no usable answer."""
        headers = {"content-type": "application/json"}
        if self.cfg.token is not None:
            headers["authorization"] = f"Bearer {self.cfg.token.reveal()}"
        body = NodeEvent(event, self.node, reason[:400]).encode()
        try:
            response = await self._client.post(self.url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise ProxyUnreachable(f"proxy {self.cfg.url}: {type(exc).__name__}: {exc}") from exc
        if response.status_code == 401:
            raise ProxyUnreachable(f"proxy {self.cfg.url} refused the token (401); "
                                   "check proxy.token_file against the proxy's control token")
        if response.status_code != 200:
            raise ProxyUnreachable(f"proxy {self.cfg.url} answered {response.status_code}: "
                                   f"{response.text[:200]}")
        try:
            reply = decode_reply(response.content)
        except EventError as exc:
            raise ProxyUnreachable(f"proxy {self.cfg.url} sent a bad reply: {exc}") from exc
        log.info("proxy: %s -> allowed=%s state=%s in_flight=%d held=%d %s", event, reply.allowed,
                 reply.state, reply.in_flight, reply.held, reply.reason)
        return reply
