"""The agent's side of the event protocol: tell the edge proxy what the node is doing.

Every event carries the node's model ids (``models``, when a source is given), so the proxy
can list them while the node sleeps. A proxy from before that field answers 400 naming it;
the client then sends its events without it for the rest of its life.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import httpx

from inference_node.errors import ProxyUnreachable
from shared.config.node import ProxySection
from shared.events import (
    EVENTS_PATH,
    HELD_PATH,
    EventError,
    EventKind,
    EventReply,
    HeldWork,
    NodeEvent,
    decode_held,
    decode_reply,
)

log = logging.getLogger(__name__)


class ProxyClient:
    """Sends ``suspending`` / ``resumed`` / ``ready`` for one node to the configured proxy."""

    def __init__(self, cfg: ProxySection, node: str,
                 models: Callable[[], Sequence[str]] | None = None) -> None:
        self.cfg = cfg
        self.node = node
        self.models = models  # the ids the node serves now; None: events carry no models
        self.sent_models: tuple[str, ...] | None = None  # in the last event the proxy took
        self.url = cfg.url.rstrip("/") + EVENTS_PATH
        self.held_url = cfg.url.rstrip("/") + HELD_PATH.format(node=node)
        # Made once, here: building a client (its TLS context) takes ~30 ms of CPU that would
        # otherwise stall the event loop on every event, on the wake path. No kept-alive
        # connections: one would not survive the machine's sleep.
        self._client = httpx.AsyncClient(timeout=cfg.timeout_s,
                                         limits=httpx.Limits(max_keepalive_connections=0))

    async def aclose(self) -> None:
        await self._client.aclose()

    async def send(self, event: EventKind, reason: str,
                   unloading: tuple[str, ...] | None = None) -> EventReply:
        """POST one event (``unloading``: the instances an ``unloading`` event names); raise
        ``ProxyUnreachable`` (one line) when there is no usable answer."""
        headers = {"content-type": "application/json", **self._auth()}
        models = None if self.models is None else tuple(self.models())
        response = await self._post(NodeEvent(event, self.node, reason[:400], models,
                                              unloading), headers)
        if response.status_code == 400 and models is not None and _refuses_models(response):
            log.warning("proxy %s does not take model lists (%s); sending events without "
                        "them (upgrade the proxy so it lists this node's models while it "
                        "sleeps)", self.cfg.url, response.text[:200].strip())
            self.models = models = None
            if event == "models":
                raise ProxyUnreachable(f"proxy {self.cfg.url} does not take model lists")
            response = await self._post(NodeEvent(event, self.node, reason[:400],
                                                  unloading=unloading), headers)
        check_answer(self.cfg.url, response)
        try:
            reply = decode_reply(response.content)
        except EventError as exc:
            raise ProxyUnreachable(f"proxy {self.cfg.url} sent a bad reply: {exc}") from exc
        if models is not None:
            self.sent_models = models
        log.info("proxy: %s -> allowed=%s state=%s in_flight=%d held=%d %s", event, reply.allowed,
                 reply.state, reply.in_flight, reply.held, reply.reason)
        return reply

    async def held(self) -> HeldWork:
        """What the proxy holds for this node now (``HELD_PATH``); ``ProxyUnreachable`` (one
        line) without a usable answer, also from a proxy that lacks the path (404)."""
        try:
            response = await self._client.get(self.held_url, headers=self._auth())
        except httpx.HTTPError as exc:
            raise ProxyUnreachable(f"proxy {self.cfg.url}: {type(exc).__name__}: {exc}") from exc
        check_answer(self.cfg.url, response, HELD_PATH.format(node=self.node))
        try:
            return decode_held(response.content)
        except EventError as exc:
            raise ProxyUnreachable(f"proxy {self.cfg.url} sent a bad held list: {exc}") from exc

    def _auth(self) -> dict[str, str]:
        if self.cfg.token is None:
            return {}
        return {"authorization": f"Bearer {self.cfg.token.reveal()}"}

    async def _post(self, event: NodeEvent, headers: dict[str, str]) -> httpx.Response:
        try:
            return await self._client.post(self.url, content=event.encode(), headers=headers)
        except httpx.HTTPError as exc:
            raise ProxyUnreachable(f"proxy {self.cfg.url}: {type(exc).__name__}: {exc}") from exc


def _refuses_models(response: httpx.Response) -> bool:
    """The 400 of a proxy from before model lists: the ``models`` field (or the ``models``
    event) is what it refused, not merely a word in its list of what it allows."""
    return b"models: unknown field" in response.content or \
        b"found 'models'" in response.content


def check_answer(url: str, response: httpx.Response, path: str = "") -> None:
    """Raise ``ProxyUnreachable`` (one line) unless the proxy at ``url`` answered 200."""
    if response.status_code == 401:
        raise ProxyUnreachable(f"proxy {url} refused the token (401); "
                               "check proxy.token_file against the proxy's control token")
    if response.status_code != 200:
        to = f" to {path}" if path else ""
        raise ProxyUnreachable(f"proxy {url} answered {response.status_code}{to}: "
                               f"{response.text[:200]}")
