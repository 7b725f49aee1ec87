"""The agent's side of the report protocol: POST one batch, read how far it was stored."""

from __future__ import annotations

import httpx

from inference_node.errors import ProxyUnreachable
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
        if response.status_code == 401:
            raise ProxyUnreachable(f"proxy {self.cfg.url} refused the token (401); "
                                   "check proxy.token_file against the proxy's control token")
        if response.status_code != 200:
            raise ProxyUnreachable(f"proxy {self.cfg.url} answered {response.status_code} to "
                                   f"{REPORTS_PATH}: {response.text[:200]}")
        try:
            reply = decode_reply(response.content)
        except ReportError as exc:
            raise ProxyUnreachable(f"proxy {self.cfg.url} sent a bad reply to {REPORTS_PATH}: "
                                   f"{exc}") from exc
        if reply.stream != batch.stream:
            raise ProxyUnreachable(f"proxy {self.cfg.url} answered for stream {reply.stream!r}, "
                                   f"not {batch.stream!r}")
        return reply
