"""Two hosts on one machine for the sleep/wake end-to-end test and the wake-timeline benchmark.

``router`` and ``gpubox`` are network namespaces joined by a veth pair (10.201.0.1 and
10.201.0.2/24). The edge-proxy and the clients run in a process that lives in the router
namespace (the test scenarios run under ``ip netns exec``; the benchmark moves its main thread
there before it starts trio, so every thread it makes is there too); the node-agent and its
real llama-server run as processes in the gpubox namespace. The agent's suspend command is ``netns_sleep.py``: the box
drops every incoming TCP packet until a magic packet for its MAC reaches UDP port 9, which the
proxy sends to 10.201.0.255, a broadcast address inside the namespace this harness made.

Needs root (namespaces, nftables); nothing leaves the namespaces.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import tomli_w
import trio

from edge_proxy.service import Proxy, serve_proxy
from shared.config.edge import load_edge_config
from tests.support import netns_sleep

REPO = Path(__file__).resolve().parents[2]
HOOK = REPO / "deploy" / "system-sleep" / "llamanap"
ROUTER_IP, GPUBOX_IP, BROADCAST = "10.201.0.1", "10.201.0.2", "10.201.0.255"
MAC = "02:6c:6e:00:00:02"
TOKEN = "e2e-token"
BACKEND_PORT, API_PORT, CONTROL_PORT = 8080, 9181, 9180
CLONE_NEWNET = 0x40000000
HOSTS_ENV = "LLAMANAP_NETNS_HOSTS"  # the Hosts, as JSON, for a process started inside
PROMPT = "The quick brown fox"
SLOT_CTX = 8192  # context per llama-server slot (4 slots)
N_PREDICT = 24


def netns_problem() -> str | None:
    """Why this machine cannot build the namespaces, or None."""
    if os.geteuid() != 0:
        return "needs root to build network namespaces"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"needs the {tool!r} tool (Debian packages iproute2, nftables)"
    return None


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@dataclass(frozen=True)
class Hosts:
    router: str
    gpubox: str
    veth_router: str
    veth_gpubox: str


@contextmanager
def two_hosts() -> Iterator[Hosts]:
    """Build the namespaces and the veth pair; remove them on the way out."""
    tag = f"{os.getpid() % 100000}"
    hosts = Hosts(f"lnap-r-{tag}", f"lnap-g-{tag}", f"lnr{tag}", f"lng{tag}")
    try:
        _run("ip", "netns", "add", hosts.router)
        _run("ip", "netns", "add", hosts.gpubox)
        _run("ip", "link", "add", hosts.veth_router, "netns", hosts.router, "type", "veth",
             "peer", "name", hosts.veth_gpubox, "netns", hosts.gpubox)
        for ns, dev, ip in ((hosts.router, hosts.veth_router, ROUTER_IP),
                            (hosts.gpubox, hosts.veth_gpubox, GPUBOX_IP)):
            _run("ip", "-n", ns, "addr", "add", f"{ip}/24", "brd", "+", "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        yield hosts
    finally:
        for ns in (hosts.router, hosts.gpubox):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


@contextmanager
def inside(ns: str) -> Iterator[None]:
    """Move the calling thread into namespace ``ns`` (and back on the way out).

    Threads it starts meanwhile stay there: use it around a whole ``trio.run`` in a process of
    its own (the benchmark), never inside a longer-lived one such as a test run."""
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        _setns(target)
        yield
    finally:
        _setns(original)
        os.close(target)
        os.close(original)


def write_configs(folder: Path, hosts: Hosts, model: Path, llama_server: Path, *,
                  idle_timeout_s: float, defaults: bool = False,
                  power: dict[str, Any] | None = None) -> tuple[Path, Path, Path]:
    """(edge config, agent config, sleep record file). Timings are short for tests; with
    ``defaults`` the wake-path timings (packets, probes, health checks) are the shipped ones."""
    fast_node = {} if defaults else {"wol_interval_s": 0.5, "probe_interval_s": 0.05}
    fast_health = {} if defaults else {"health": {"interval_s": 0.05}}
    token = folder / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    edge = folder / "edge-proxy.toml"
    edge.write_text(tomli_w.dumps({
        "log_level": "info",
        "control": {"listen": f"{ROUTER_IP}:{CONTROL_PORT}", "token_file": str(token)},
        "nodes": {"gpubox": {"host": GPUBOX_IP, "mac": MAC,
                             "wol": {"broadcast": BROADCAST, "port": 9},
                             "wake_timeout_s": 120, "probe_timeout_s": 0.5, **fast_node}},
        "routes": [{"listen": "127.0.0.1:0", "node": "gpubox", "backend_port": BACKEND_PORT,
                    "ready": "http:/health"}],
    }))
    agent = folder / "node-agent.toml"
    record = folder / "sleeps.log"
    agent.write_text(tomli_w.dumps({
        "log_level": "info",
        "agent": {"node": "gpubox", "api_listen": f"{GPUBOX_IP}:{API_PORT}",
                  "token_file": str(token), "state_file": str(folder / "state.toml")},
        "proxy": {"url": f"http://{ROUTER_IP}:{CONTROL_PORT}", "token_file": str(token)},
        "power": {"idle_timeout_s": idle_timeout_s, "min_awake_s": 0.0, "check_interval_s": 0.2,
                  "suspend_command": [sys.executable, netns_sleep.__file__,
                                      "--iface", hosts.veth_gpubox, "--mac", MAC,
                                      "--hook", str(HOOK), "--record", str(record)],
                  "resume_timeout_s": 3600.0, "watch_foreign_gpu_processes": False,
                  **(power or {})},
        "pstate": {"enabled": False},
        "instances": {"tiny": {"binary": str(llama_server), "model": str(model),
                               "host": GPUBOX_IP, "port": BACKEND_PORT,
                               **fast_health,
                               "args": ["-c", str(SLOT_CTX * 4), "-np", "4", "-lv", "4"]}},
    }))
    return edge, agent, record


def agent_wrapper(folder: Path, agent_cfg: Path) -> Path:
    """What the sleep hook runs as ``$NODE_AGENT``: node-agent with this harness's config."""
    path = folder / "node-agent"
    path.write_text(f"#!/bin/sh\nexec {sys.executable} -m inference_node \"$@\" "
                    f"--config {agent_cfg}\n")
    path.chmod(0o755)
    return path


@dataclass
class Stack:
    """The running pair: the in-process proxy and the agent process."""

    hosts: Hosts
    proxy: Proxy
    agent: trio.Process
    record: Path
    agent_log: Path

    def node(self) -> dict[str, Any]:
        return dict(self.proxy.status()["nodes"]["gpubox"])

    async def agent_get(self, path: str) -> Any:
        async with httpx.AsyncClient(timeout=30, headers={"authorization": f"Bearer {TOKEN}"}) as c:
            response = await c.get(f"http://{GPUBOX_IP}:{API_PORT}{path}")
            response.raise_for_status()
            return response.json()

    async def instances_ready(self) -> bool:
        """Whether the agent answers and every instance is READY."""
        try:
            status = await self.agent_get("/v1/status")
        except httpx.HTTPError:
            return False
        return all(i["state"] == "ready" for i in status["instances"])

    def sleeps(self) -> list[tuple[str, float]]:
        """``("asleep" | "packet" | "awake", wall time)`` lines the suspend command wrote."""
        if not self.record.exists():
            return []
        return [(w, float(t)) for w, t in (line.split() for line in self.record.read_text().split("\n")
                                          if line)]


async def start(nursery: trio.Nursery, folder: Path, hosts: Hosts, model: Path,
                llama_server: Path, *, idle_timeout_s: float, defaults: bool = False,
                power: dict[str, Any] | None = None) -> Stack:
    """Start the proxy (this thread must be inside the router namespace) and the agent;
    ``power`` overrides the agent's [power] settings."""
    edge, agent_cfg, record = write_configs(folder, hosts, model, llama_server,
                                            idle_timeout_s=idle_timeout_s, defaults=defaults,
                                            power=power)
    proxy: Proxy = await nursery.start(serve_proxy, load_edge_config(edge))
    log = folder / "node-agent.log"
    env = {**os.environ, "NODE_AGENT": str(agent_wrapper(folder, agent_cfg)),
           "PYTHONPATH": str(REPO)}
    with log.open("ab") as out:
        agent = await trio.lowlevel.open_process(
            ["ip", "netns", "exec", hosts.gpubox, sys.executable, "-m", "inference_node", "run",
             "--config", str(agent_cfg)], stdout=out, stderr=out, env=env)
    return Stack(hosts, proxy, agent, record, log)


async def stop(stack: Stack) -> None:
    """Stop the agent (thawed first, in case a test ends while the box "sleeps"), then any
    "sleep" still waiting for its magic packet, and take its nftables rule away."""
    if stack.agent.returncode is None:
        os.kill(stack.agent.pid, signal.SIGCONT)  # `ip netns exec` became the agent
        stack.agent.terminate()
        with trio.move_on_after(30):
            await stack.agent.wait()
        if stack.agent.returncode is None:
            stack.agent.kill()
            await stack.agent.wait()
    subprocess.run(["pkill", "-f", f"netns_sleep.py --iface {stack.hosts.veth_gpubox} "],
                   capture_output=True, check=False)
    subprocess.run(["ip", "netns", "exec", stack.hosts.gpubox, "nft", "delete", "table", "inet",
                    netns_sleep.TABLE], capture_output=True, check=False)


@dataclass
class Completion:
    text: str
    first_byte: float  # wall time the first response byte arrived
    done: bool  # the stream ended with its final chunk
    tokens: int  # tokens_predicted, from the final chunk


async def complete(address: tuple[str, int], *, n_predict: int = N_PREDICT,
                   timeout_s: float = 180.0) -> Completion:
    """A streamed ``/completion`` through the proxy of exactly ``n_predict`` tokens, read to
    its end."""
    body = {"prompt": PROMPT, "n_predict": n_predict, "temperature": 0, "top_k": 1,
            "stream": True, "cache_prompt": False, "seed": 1, "ignore_eos": True}
    text, first, done, tokens = [], 0.0, False, 0
    url = f"http://{address[0]}:{address[1]}/completion"
    async with httpx.AsyncClient(timeout=timeout_s) as client, \
            client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not first:
                first = time.time()
            if not line.startswith("data: "):
                continue
            chunk = json.loads(line[6:])
            text.append(chunk.get("content", ""))
            if chunk.get("stop"):
                done, tokens = True, int(chunk.get("tokens_predicted", 0))
    return Completion("".join(text), first, done, tokens)
