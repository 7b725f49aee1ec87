"""A real headless Chromium that loads a page from a loopback server, runs its JS, and hands
back the DOM it built, what it printed to the console, and a screenshot.

Chromium only ever talks to loopback here: every host name but 127.0.0.1 resolves to
nothing, and its background traffic (updates, sync, metrics) is switched off.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest
import trio

# Bounds that stop a hung browser on a loaded machine, never a speed check.
BROWSER_TIMEOUT_S: Final = 120.0
# Virtual time the page gets to fetch its JSON and draw (it polls every few seconds).
VIRTUAL_TIME_BUDGET_MS: Final = 5000
WINDOW_SIZE: Final = "1280,2400"
_CONSOLE: Final = re.compile(r":CONSOLE[:(]")
_FLAGS: Final = (
    "--headless", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--disable-breakpad",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    "--enable-logging=stderr", "--v=0")


@dataclass(frozen=True)
class Loaded:
    """What the browser made of a page."""

    dom: str
    console: list[str]  # every console message and uncaught error, one line each

    def count(self, **attrs: str) -> int:
        """Elements whose data-* attributes have these values (``kind="ttft"`` matches
        ``data-kind="ttft"``), counted in the serialized DOM."""
        return len(re.findall(_tag_pattern(attrs), self.dom))


def _tag_pattern(attrs: dict[str, str]) -> str:
    looks = "".join(f'(?=[^>]*\\sdata-{k.replace("_", "-")}="{re.escape(v)}")'
                    for k, v in attrs.items())
    return f"<[a-zA-Z]+{looks}[^>]*>"


def chromium() -> str:
    """The browser binary; its absence fails the test with the way to install it."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("no chromium on PATH: install the Debian package chromium "
                    "(scripts/test.sh does, when run as root)")
    return found


def chromium_command(profile: Path, *extra: str) -> list[str]:
    """The browser's argv: headless, loopback only, its own profile folder."""
    command = [chromium(), *_FLAGS, f"--user-data-dir={profile}", *extra]
    if os.geteuid() == 0:
        command.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
    return command


def _command(profile: Path, *extra: str) -> list[str]:
    return chromium_command(profile, f"--virtual-time-budget={VIRTUAL_TIME_BUDGET_MS}", *extra)


async def _run(command: list[str]) -> tuple[bytes, list[str]]:
    with trio.fail_after(BROWSER_TIMEOUT_S):
        done = await trio.run_process(command, capture_stdout=True, capture_stderr=True,
                                      check=False)
    err = done.stderr.decode(errors="replace").splitlines()
    if done.returncode != 0:
        raise AssertionError(f"chromium exited {done.returncode}:\n" + "\n".join(err[-20:]))
    return done.stdout, [line for line in err if _CONSOLE.search(line)]


async def load(url: str, tmp_path: Path, *, screenshot: Path | None = None) -> Loaded:
    """Load ``url``, let its scripts run, return the DOM and console; with ``screenshot``,
    also save a PNG of the page as a person would see it."""
    profile = tmp_path / "chromium-profile"
    out, console = await _run(_command(profile, "--dump-dom", url))
    if screenshot is not None:
        _, more = await _run(_command(profile, f"--window-size={WINDOW_SIZE}",
                                      f"--screenshot={screenshot}", url))
        console += more
        assert screenshot.stat().st_size > 0, f"chromium wrote no screenshot to {screenshot}"
    return Loaded(out.decode(), console)
