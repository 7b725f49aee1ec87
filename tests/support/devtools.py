"""Headless Chromium driven over the DevTools protocol (a websocket on loopback), for what
a one-shot ``--dump-dom`` cannot show: a page that keeps running while the test changes
what the server returns, so it can check that the page updates without a reload.

A tiny client: wsproto over a trio TCP stream, one reader task that routes answers to
their callers and keeps every console message, uncaught exception and log entry.
"""

from __future__ import annotations

import base64
import itertools
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Message, Request, TextMessage

from tests.support.browser import BROWSER_TIMEOUT_S, WINDOW_SIZE, chromium_command

POLL_S: Final = 0.1
_LISTENING: Final = re.compile(rb"DevTools listening on (ws://\S+)")


@dataclass
class Page:
    """One tab: evaluate JS in it, wait for a condition, read what its console said."""

    browser: Browser
    session: str
    console: list[str] = field(default_factory=list)

    async def evaluate(self, expression: str) -> Any:
        """The value of ``expression`` (awaited if it is a promise); an exception fails."""
        result = await self.browser.call("Runtime.evaluate", {
            "expression": expression, "returnByValue": True, "awaitPromise": True},
            session=self.session)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout_s: float = BROWSER_TIMEOUT_S) -> Any:
        """Poll until ``expression`` is truthy; return its value."""
        with trio.fail_after(timeout_s):
            while not (value := await self.evaluate(expression)):
                await trio.sleep(POLL_S)
        return value

    async def count(self, selector: str) -> int:
        """How many elements match the CSS ``selector`` now."""
        return int(await self.evaluate(
            f"document.querySelectorAll({json.dumps(selector)}).length"))

    async def screenshot(self, path: Path) -> None:
        """The whole page as a PNG at ``path``."""
        shot = await self.browser.call("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True}, session=self.session)
        path.write_bytes(base64.b64decode(shot["data"]))


class Browser:
    """The browser behind one DevTools websocket."""

    def __init__(self, stream: trio.SocketStream, ws: WSConnection) -> None:
        self._stream = stream
        self._ws = ws
        self._ids = itertools.count(1)
        self._waiting: dict[int, trio.MemorySendChannel[dict[str, Any]]] = {}
        self._pages: dict[str, Page] = {}

    async def call(self, method: str, params: dict[str, Any] | None = None, *,
                   session: str | None = None) -> dict[str, Any]:
        """Send one command and return its result; a protocol error fails the test."""
        ident = next(self._ids)
        message: dict[str, Any] = {"id": ident, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        send, receive = trio.open_memory_channel[dict[str, Any]](1)
        self._waiting[ident] = send
        await self._stream.send_all(self._ws.send(TextMessage(json.dumps(message))))
        with trio.fail_after(BROWSER_TIMEOUT_S):
            answer = await receive.receive()
        if "error" in answer:
            raise AssertionError(f"{method}: {answer['error']}")
        result: dict[str, Any] = answer.get("result", {})
        return result

    async def open(self, url: str) -> Page:
        """A new tab at ``url`` that reports its console to the returned ``Page``."""
        target = await self.call("Target.createTarget", {"url": "about:blank"})
        attached = await self.call("Target.attachToTarget",
                                   {"targetId": target["targetId"], "flatten": True})
        page = Page(self, attached["sessionId"])
        self._pages[page.session] = page
        width, height = WINDOW_SIZE.split(",")
        for method, params in (("Runtime.enable", {}), ("Log.enable", {}), ("Page.enable", {}),
                               ("Emulation.setDeviceMetricsOverride", {
                                   "width": int(width), "height": int(height),
                                   "deviceScaleFactor": 1, "mobile": False}),
                               ("Page.navigate", {"url": url})):
            await self.call(method, params, session=page.session)
        return page

    async def read(self) -> None:
        """Until the socket closes: answers to their callers, console output to its page."""
        buffer = ""
        while data := await self._stream.receive_some():
            self._ws.receive_data(data)
            for event in self._ws.events():
                if isinstance(event, TextMessage):
                    buffer += event.data
                    if event.message_finished:
                        self._dispatch(json.loads(buffer))
                        buffer = ""
                elif isinstance(event, Message):
                    continue
                elif isinstance(event, CloseConnection):
                    return

    def _dispatch(self, message: dict[str, Any]) -> None:
        if "id" in message:
            channel = self._waiting.pop(message["id"], None)
            if channel is not None:
                channel.send_nowait(message)
            return
        page = self._pages.get(message.get("sessionId", ""))
        if page is None:
            return
        params = message.get("params", {})
        if message["method"] == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"])
            page.console.append(f"console.{params['type']}: {text}")
        elif message["method"] == "Runtime.exceptionThrown":
            page.console.append(f"uncaught: {params['exceptionDetails']}")
        elif message["method"] == "Log.entryAdded":
            entry = params["entry"]
            page.console.append(f"log {entry['level']}: {entry['text']} {entry.get('url', '')}")


async def _drain(stream: trio.abc.ReceiveStream, found: trio.MemorySendChannel[str]) -> None:
    """Read the browser's stderr to the end (it logs a lot); hand on the DevTools URL."""
    seen = b""
    sent = False
    while data := await stream.receive_some():
        if not sent:
            seen += data
            if m := _LISTENING.search(seen):
                found.send_nowait(m.group(1).decode())
                sent = True


@asynccontextmanager
async def open_browser(tmp_path: Path) -> AsyncIterator[Browser]:
    """A headless Chromium for the body's lifetime, killed and reaped after."""
    command = chromium_command(tmp_path / "chromium-devtools", "--remote-debugging-port=0",
                               "about:blank")
    async with trio.open_nursery() as nursery:
        process = await nursery.start(lambda task_status: trio.run_process(
            command, stdin=b"", stderr=-1, check=False, task_status=task_status))
        send, receive = trio.open_memory_channel[str](1)
        nursery.start_soon(_drain, process.stderr, send)
        with trio.fail_after(BROWSER_TIMEOUT_S):
            url = await receive.receive()
        parts = urlsplit(url)
        stream = await trio.open_tcp_stream(parts.hostname or "127.0.0.1", parts.port or 0)
        ws = WSConnection(ConnectionType.CLIENT)
        await stream.send_all(ws.send(Request(host=parts.netloc, target=parts.path)))
        with trio.fail_after(BROWSER_TIMEOUT_S):
            while not any(isinstance(e, AcceptConnection) for e in ws.events()):
                ws.receive_data(await stream.receive_some())
        browser = Browser(stream, ws)
        nursery.start_soon(browser.read)
        try:
            yield browser
        finally:
            process.kill()  # run_process reaps it as the nursery ends
            nursery.cancel_scope.cancel()
    await stream.aclose()
