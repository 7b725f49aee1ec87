"""``node-agent hook pre|post``: the system-sleep hook's call to the agent.

It runs on a resume's critical path (the agent restarts its instances when it hears ``post``),
so it uses the standard library only and starts in a fraction of the full command line's time.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import urllib.parse
from collections.abc import Sequence

from inference_node.client import AgentClient, client_options
from shared.errors import LlamanapError

HOOK_TIMEOUT_S = 5.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("phase", choices=["pre", "post"])
    p.add_argument("when", nargs="?", help="what systemd passes second (suspend, hibernate, ...); ignored")


def send(base_url: str, token: str | None, phase: str, timeout_s: float = HOOK_TIMEOUT_S) -> str:
    """POST the phase to the agent; its one-line answer, or ``LlamanapError`` saying why not."""
    url = urllib.parse.urlsplit(base_url)
    if url.scheme != "http" or not url.hostname:
        raise LlamanapError(f"agent URL {base_url!r}: expected http://HOST:PORT")
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=timeout_s)
    try:
        conn.request("POST", "/v1/power/hook", json.dumps({"phase": phase}), headers)
        response = conn.getresponse()
        body = response.read()
    except OSError as exc:
        raise LlamanapError(f"cannot reach node-agent at {base_url} ({exc}); is it running? "
                            "(systemctl status node-agent)") from exc
    finally:
        conn.close()
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if response.status != 200 or not isinstance(data, dict):
        message = data.get("error", {}).get("message") if isinstance(data, dict) else None
        raise LlamanapError(message or f"HTTP {response.status} from {base_url}/v1/power/hook")
    return str(data.get("result", ""))


def run(args: argparse.Namespace) -> int:
    client = AgentClient.from_args(args)
    print(send(client.base_url, client.token, args.phase))
    return 0


def main(argv: Sequence[str]) -> int:
    """``node-agent hook ...`` without building the rest of the command line."""
    p = argparse.ArgumentParser(prog="node-agent hook", parents=[client_options()],
                                description="Tell the agent the system sleeps (pre) or woke (post).")
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except LlamanapError as exc:
        print(f"node-agent: error: {exc}", file=sys.stderr)
        return 1
