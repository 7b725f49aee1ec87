"""The agent's side of the report protocol: POST one batch, read how far it was stored."""

from __future__ import annotations

import httpx

from inference_node.errors import ProxyUnreachable
from inference_node.power.proxy_client import check_answer
from shared.config.node import ProxySection
from shared.reports import REPORTS_PATH, ReportBatch, ReportError, ReportReply, decode_reply


class ReportClient:
    """Sends report batches of one node to the configured proxy."""

    def __init__(self, cfg: ProxySection) -> None:
        self.cfg = cfg
        self.url = cfg.url.rstrip("/") + REPORTS_PATH
        # No kept-alive connections: one would not survive the machine's sleep.
        self._client = httpx.AsyncClient(timeout=cfg.timeout_s,
                                         limits=httpx.Limits(max_keepalive_connections=0))

    async def aclose(self) -> None:
        await self._client.aclose()

    async def send(self, batch: ReportBatch) -> ReportReply:
        """POST ``batch``; raise ``ProxyUnreachable`` (one line) without a usable answer."""
        headers = {"content-type": "application/json"}
        if self.cfg.token is not None:
            headers["authorization"] = f"Bearer {self.cfg.token.reveal()}"
        try:
            response = await self._client.post(self.url, content=batch.encode(), headers=headers)
        except httpx.HTTPError as exc:
            raise ProxyUnreachable(f"proxy {self.cfg.url}: {type(exc).__name__}: {exc}") from exc
        check_answer(self.cfg.url, response, REPORTS_PATH)
        try:
            reply = decode_reply(response.content)
        except ReportError as exc:
            raise ProxyUnreachable(f"proxy {self.cfg.url} sent a bad reply to {REPORTS_PATH}: "
                                   f"{exc}") from exc
        if reply.stream != batch.stream:
            raise ProxyUnreachable(f"proxy {self.cfg.url} answered for stream {reply.stream!r}, "
                                   f"not {batch.stream!r}")
        return reply
