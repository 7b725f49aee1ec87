"""The command line's HTTP client for a running node-agent's control API.

Where the agent is: ``--url`` (and ``--token-file``), or the ``[agent]`` section of the config
file (``api_listen`` and ``token``/``token_file``). A wildcard listen address is reached on
loopback.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inference_node.errors import AgentRefused, AgentUnreachable
from shared.config.loader import Context, build, read_toml
from shared.config.node import DEFAULT_CONFIG, AgentSection
from shared.errors import LlamanapError

# Control calls are quick; actions with --wait pass their own longer budget.
REQUEST_TIMEOUT_S = 10.0
WAIT_MARGIN_S = 10.0


def client_options() -> argparse.ArgumentParser:
    """``--config``, ``--url``, ``--token-file``: a parent parser for commands that call the agent."""
    client = argparse.ArgumentParser(add_help=False)
    group = client.add_argument_group("where the agent is")
    group.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                       help=f"read api_listen and the token from it (default {DEFAULT_CONFIG})")
    group.add_argument("--url", help="the agent's API, e.g. http://127.0.0.1:9181 (skips --config)")
    group.add_argument("--token-file", type=Path, help="file holding the bearer token")
    return client


@dataclass(frozen=True)
class AgentClient:
    base_url: str
    token: str | None = None

    @classmethod
    def locate(cls, url: str | None, token_file: Path | None, config: Path) -> AgentClient:
        """A client from ``--url``/``--token-file``, or else from the agent's config file."""
        token = None
        if token_file is not None:
            try:
                token = token_file.read_text().strip() or None
            except OSError as exc:
                raise LlamanapError(f"--token-file {token_file}: cannot read it ({exc.strerror})") from exc
        if url is not None:
            return cls(url.rstrip("/"), token)
        # Only [agent] matters here: a mistake elsewhere in the file must not stop
        # `status` from showing the agent's view of it.
        path = config.absolute()
        section = build(AgentSection, read_toml(path).get("agent", {}), Context(path), "agent")
        host, _, port = section.api_listen.rpartition(":")
        host = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]"}.get(host, host)
        if port == "0":
            raise LlamanapError(f"{config}: agent.api_listen has port 0, so the CLI cannot find "
                                "the agent; pass --url http://HOST:PORT")
        secret = section.token
        return cls(f"http://{host}:{port}", token or (secret.reveal() if secret else None))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> AgentClient:
        """The client for a command parsed with ``client_options()``."""
        return cls.locate(args.url, args.token_file, args.config)

    def get(self, path: str, **params: str) -> Any:
        return self._call("GET", path, params=params)

    def post(self, path: str, body: dict[str, Any] | None = None, *,
             timeout_s: float = REQUEST_TIMEOUT_S) -> Any:
        return self._call("POST", path, json=body or {}, timeout_s=timeout_s)

    def delete(self, path: str) -> Any:
        return self._call("DELETE", path)

    def _call(self, method: str, path: str, *, timeout_s: float = REQUEST_TIMEOUT_S,
              **kwargs: Any) -> Any:
        import httpx  # here, so that finding the agent (``locate``) stays light

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        url = self.base_url + path
        try:
            response = httpx.request(method, url, headers=headers, timeout=timeout_s, **kwargs)
        except httpx.TimeoutException as exc:
            raise AgentUnreachable(f"node-agent at {self.base_url} did not answer within "
                                   f"{timeout_s:g} s") from exc
        except httpx.HTTPError as exc:
            raise AgentUnreachable(f"cannot reach node-agent at {self.base_url} ({exc}); is it "
                                   "running? (systemctl status node-agent)") from exc
        try:
            data = response.json()
        except ValueError:
            data = None
        if response.status_code >= 400:
            message = (data or {}).get("error", {}).get("message") if isinstance(data, dict) else None
            raise AgentRefused(response.status_code,
                               message or f"HTTP {response.status_code} from {url}")
        return data
