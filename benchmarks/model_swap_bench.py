"""Model swap benchmark: llama.cpp's router vs llamanap vs llama-server started by hand, on the
same two tiny models and the same llama-server build, side by side in one run.

Run: ``.venv/bin/python benchmarks/model_swap_bench.py [--quick]``. Prints one table.

Columns, all on 127.0.0.1:

- **direct**: the floor, a swap by hand: the running ``llama-server`` is stopped (SIGTERM,
  until it exits) and ``llama-server -m MODEL`` started for the next request; time to first
  token is counted from the stop (from the spawn when nothing ran), so it is llama-server's
  own stop, start-and-load time plus its first token.
- **router**: ``llama-server --models-dir DIR --models-max 1`` (router mode, autoload on). It
  names each model by its file stem; a request for a model that is not loaded spawns a child
  for it and, past ``--models-max``, stops the least recently used one first.
- **llamanap**: ``edge-proxy run`` + ``node-agent run`` (fresh per run, nothing loaded), a
  memory budget that holds one model, both instances ``load = "on-demand"`` with the default
  start-up health checks (the agent probes as soon as llama-server logs ``model loaded``, so
  its 0.25 s interval does not set its resolution), one HTTP route per instance. Needs the
  agent's on-demand instances; where this tree's node config has no such key the column says
  so instead of measuring.
- **agent**: the same node-agent without the proxy: ``POST /v1/models/NAME/load``, then the
  request to the instance's own port. llamanap minus agent is the proxy's own share.

Rows: "cold" (nothing loaded; first request for A) and "swap" (alternating B/A/B/A... each
request for the model that is not loaded). Per request: time to first token (request sent, or
spawn for direct, to the first streamed ``data:`` event with a token). Overhead rows: each
column's p50 minus direct's p50, i.e. what it adds beyond llama-server's own start-and-load.

Targets: llamanap's overhead <= 30 ms p50 per load; its cold time to first token no worse than
the router's.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import tomli_w

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from shared.llama_bin import find_llama_server  # noqa: E402
from shared.tiny_gguf import TinyModelSpec, write_tiny_model  # noqa: E402

LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 120.0
POLL_S = 0.005  # health polls of the direct column: its resolution adds to the floor
TERM_GRACE_S = 5.0
COLD_RUNS, QUICK_COLD_RUNS = 5, 2
SWAPS, QUICK_SWAPS = 10, 4
MAX_TOKENS = 4
# Large enough (8 x 512-wide layers, F32: ~135 MB each) that loading is a measurable part of
# the time, small enough that a run takes a minute on two cores.
MODEL_SPEC = TinyModelSpec(n_layer=8, n_embd=512, n_ff=2048, n_head=8)
MODEL_NAMES = ("tiny-a", "tiny-b")
LLAMA_ARGS = ("-c", "2048", "-np", "1", "-t", "1")
# Between columns: the last one's children exit (and free the cores) before the next starts.
SETTLE_S = 0.5
PROXY_PROBE_INTERVAL_S = 0.05  # only finds the agent up at the start; not on the load path


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


def write_models(folder: Path) -> dict[str, Path]:
    """The two models, one per file stem (the router's name for them)."""
    return {name: write_tiny_model(folder / f"{name}.gguf",
                                   dataclasses.replace(MODEL_SPEC, seed=i, name=name))
            for i, name in enumerate(MODEL_NAMES)}


def spawn(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, grace, SIGKILL; always waited for."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(TERM_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def process(command: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A child with its output in ``log``, stopped on the way out."""
    proc = spawn(command, log)
    try:
        yield proc
    finally:
        stop(proc)


@functools.cache
def http() -> httpx.Client:
    """The one HTTP client of every timed request, made once before any timing: making an
    httpx client (its TLS context) costs ~30 ms of CPU, which inside a timed span would be
    counted as the column's start time. No kept connections: ports are reused by the next
    process, and each request connects anew, as with a client per request."""
    return httpx.Client(timeout=REQUEST_TIMEOUT_S,
                        limits=httpx.Limits(max_keepalive_connections=0))


def wait_healthy(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.perf_counter() + START_TIMEOUT_S
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"exited with {proc.returncode}; log: {log}")
        try:
            if http().get(f"http://{LOOPBACK}:{port}/health", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(POLL_S)
    raise SystemExit(f"port {port} not healthy after {START_TIMEOUT_S:g} s; log: {log}")


def first_token(port: int, model: str, since: float | None = None) -> float:
    """Send a streaming chat completion; seconds from ``since`` (default: now) to the first
    ``data:`` event that carries a token. Raises SystemExit on an error answer."""
    start = time.perf_counter() if since is None else since
    body = {"model": model, "stream": True, "max_tokens": MAX_TOKENS,
            "messages": [{"role": "user", "content": "hello"}]}
    with http().stream("POST", f"http://{LOOPBACK}:{port}/v1/chat/completions",
                       json=body) as response:
        if response.status_code != 200:
            raise SystemExit(f"{model}: {response.status_code} {response.read()[:300]!r}")
        lines = response.iter_lines()
        for line in lines:
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            # A random-weight model may send a token that is half a UTF-8 character ("")
            if choice.get("delta", {}).get("content") is not None or choice["finish_reason"]:
                elapsed = time.perf_counter() - start
                for _ in lines:  # read the rest so the slot is free
                    pass
                return elapsed
    raise SystemExit(f"{model}: the stream ended without a token")


# ---- columns -------------------------------------------------------------------------------

def direct(binary: Path, models: dict[str, Path], order: list[str], log: Path) -> list[float]:
    """Swap by hand: stop the running llama-server (SIGTERM, wait for it to exit), start the
    next; time to first token counted from the stop (from the spawn for the first one)."""
    samples = []
    running: subprocess.Popen[bytes] | None = None
    try:
        for name in order:
            start = time.perf_counter()
            if running is not None:
                stop(running)
            port = free_port()
            running = spawn([str(binary), "-m", str(models[name]), "--alias", name, "--host",
                             LOOPBACK, "--port", str(port), *LLAMA_ARGS], log)
            wait_healthy(port, running, log)
            samples.append(first_token(port, name, since=start))
    finally:
        if running is not None:
            stop(running)
    return samples


def router(binary: Path, folder: Path, order: list[str], log: Path) -> list[float]:
    """One router process for the whole order: the first request is cold, each later one
    (for the model that is not loaded) a swap."""
    port = free_port()
    with process([str(binary), "--models-dir", str(folder), "--models-max", "1", "--host",
                  LOOPBACK, "--port", str(port), *LLAMA_ARGS], log) as proc:
        wait_healthy(port, proc, log)
        return [first_token(port, name) for name in order]


def llamanap_missing() -> str | None:
    """Why the llamanap column cannot run on this tree, or None when it can."""
    from shared.config import node
    if "load" in {f.name for f in dataclasses.fields(node.InstanceConfig)}:
        return None
    return ("not run: this tree's node-agent has no on-demand instances "
            "(instances.NAME.load); it lands with the agent's on-demand work")


def write_llamanap(folder: Path, binary: Path, models: dict[str, Path]
                   ) -> tuple[Path, Path, dict[str, int], dict[str, int], int]:
    """Agent and proxy configs: both instances on demand, a budget that holds one, one HTTP
    route per instance. Returns (agent config, proxy config, route port per model, instance
    port per model, agent port)."""
    from shared.config.loader import Context, build
    from shared.config.node import InstanceConfig

    # (imported by name: the module lands with the agent's on-demand work)
    instance_need = importlib.import_module("inference_node.ondemand.estimate").instance_need

    instances: dict[str, Any] = {}
    routes = {}
    for name, path in models.items():
        instances[name] = {
            "model": str(path), "binary": str(binary), "port": free_port(),
            "args": list(LLAMA_ARGS), "load": "on-demand", "models": [name]}
        routes[name] = free_port()
    needs = [sum(instance_need(n, build(InstanceConfig, t, Context(folder / "x.toml"),
                                        f"instances.{n}"), []).values())
             for n, t in instances.items()]
    agent_port = free_port()
    agent_cfg = folder / "node-agent.toml"
    agent_cfg.write_text(tomli_w.dumps({
        "agent": {"api_listen": f"{LOOPBACK}:{agent_port}", "state_file": str(folder / "s.toml"),
                  "memory_budget_mib": int(max(needs) + min(needs) / 2)},
        "power": {"enabled": False}, "pstate": {"enabled": False}, "instances": instances}))
    proxy = {"control": {"listen": f"{LOOPBACK}:0"},
             "nodes": {"box": {"host": LOOPBACK, "mac": "02:00:00:00:00:01",
                               "wol": {"broadcast": LOOPBACK, "port": free_port()},
                               "probe_interval_s": PROXY_PROBE_INTERVAL_S, "probe_timeout_s": 0.5,
                               "agent_url": f"http://{LOOPBACK}:{agent_port}"}},
             "routes": [{"listen": f"{LOOPBACK}:{routes[n]}", "node": "box",
                         "backend_port": instances[n]["port"], "ready": "http:/health",
                         "protocol": "http"} for n in models]}
    proxy_cfg = folder / "edge-proxy.toml"
    proxy_cfg.write_text(tomli_w.dumps(proxy))
    return agent_cfg, proxy_cfg, routes, {n: t["port"] for n, t in instances.items()}, agent_port


def llamanap(binary: Path, models: dict[str, Path], order: list[str], folder: Path,
             log: Path) -> list[float]:
    """A fresh agent and proxy per run (nothing loaded): the first request is cold."""
    agent_cfg, proxy_cfg, routes, _, agent_port = write_llamanap(folder, binary, models)
    # the agent first: a proxy that found the node down waits for a request or an event
    with process([sys.executable, "-m", "inference_node", "run", "--config", str(agent_cfg)],
                 log) as agent:
        wait_agent_listed(agent_port, agent, log)
        with process([sys.executable, "-m", "edge_proxy", "run", "-c", str(proxy_cfg)],
                     log) as proxy:
            wait_listed(routes[order[0]], proxy, log, set(models))
            return [first_token(routes[name], name) for name in order]


def agent_alone(binary: Path, models: dict[str, Path], order: list[str], folder: Path,
                log: Path) -> list[float]:
    """The node-agent without the proxy (fresh per run): ask it to load the model, then send
    the request to the instance's own port; counted from the load call."""
    agent_cfg, _, _, ports, agent_port = write_llamanap(folder, binary, models)
    samples = []
    with process([sys.executable, "-m", "inference_node", "run", "--config", str(agent_cfg)],
                 log) as agent:
        wait_agent_listed(agent_port, agent, log)
        for name in order:
            start = time.perf_counter()
            r = http().post(f"http://{LOOPBACK}:{agent_port}/v1/models/{name}/load")
            if r.status_code != 200:
                raise SystemExit(f"agent load {name}: {r.status_code} {r.text[:300]}")
            samples.append(first_token(ports[name], name, since=start))
    return samples


def wait_agent_listed(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.perf_counter() + START_TIMEOUT_S
    with httpx.Client(timeout=1.0) as client:
        while time.perf_counter() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"node-agent exited with {proc.returncode}; log: {log}")
            try:
                if client.get(f"http://{LOOPBACK}:{port}/v1/models").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(POLL_S)
    raise SystemExit(f"node-agent not answering after {START_TIMEOUT_S:g} s; log: {log}")


def wait_listed(port: int, proc: subprocess.Popen[bytes], log: Path, want: set[str]) -> None:
    """Until the proxy lists every model (learned from the agent, none loaded)."""
    deadline = time.perf_counter() + START_TIMEOUT_S
    with httpx.Client(timeout=1.0) as client:
        while time.perf_counter() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"edge-proxy exited with {proc.returncode}; log: {log}")
            try:
                r = client.get(f"http://{LOOPBACK}:{port}/v1/models")
                if r.status_code == 200 and want <= {m["id"] for m in r.json()["data"]}:
                    return
            except httpx.TransportError:
                pass
            time.sleep(POLL_S)
    raise SystemExit(f"edge-proxy does not list {sorted(want)} after {START_TIMEOUT_S:g} s; "
                     f"log: {log}")


# ---- report --------------------------------------------------------------------------------

def p50(values: list[float]) -> float:
    return statistics.median(values)


def report(results: dict[str, dict[str, list[float]]], notes: dict[str, str]) -> None:
    columns = ["direct", "router", "agent", "llamanap"]
    print(f"{'time to first token (ms)':<32}" + "".join(f"{c:>14}" for c in columns))

    def row(label: str, cell: dict[str, str]) -> None:
        print(f"{label:<32}" + "".join(f"{cell.get(c, 'n/a'):>14}" for c in columns))

    for kind in ("cold", "swap"):
        for stat, fn in (("p50", p50), ("max", max)):
            row(f"{kind} {stat}", {c: f"{fn(r[kind]) * 1000:.1f}" for c, r in results.items()})
        row(f"{kind} overhead vs direct, p50",
            {c: f"{(p50(r[kind]) - p50(results['direct'][kind])) * 1000:+.1f}"
             for c, r in results.items() if c != "direct"})
    for kind in ("cold", "swap"):
        row(f"{kind} samples", {c: str(len(r[kind])) for c, r in results.items()})
    for column, note in notes.items():
        print(f"{column}: {note}")
    if "llamanap" in results:
        over = (p50(results["llamanap"]["swap"]) - p50(results["direct"]["swap"])) * 1000
        cold_ok = p50(results["llamanap"]["cold"]) <= p50(results["router"]["cold"])
        # each run's two cold starts came back to back: their difference drifts less
        paired = [(n - r) * 1000 for r, n in zip(results["router"]["cold"],
                                                 results["llamanap"]["cold"], strict=True)]
        gap = (p50(results["llamanap"]["cold"]) - p50(results["router"]["cold"])) * 1000
        print(f"cold: llamanap - router, p50 {gap:+.1f} ms, paired per run {p50(paired):+.1f} "
              f"ms (runs llamanap was faster: {sum(d <= 0 for d in paired)} of {len(paired)})")
        for kind in ("cold", "swap"):
            own = (p50(results["llamanap"][kind]) - p50(results["agent"][kind])) * 1000
            print(f"{kind}: the proxy's own share (llamanap - agent, p50): {own:+.1f} ms")
        print(f"targets: overhead {over:.1f} ms p50 (<= 30: {'met' if over <= 30 else 'MISSED'});"
              f" cold no worse than the router: {'met' if cold_ok else 'MISSED'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs")
    parser.add_argument("--cold-runs", type=int, metavar="N",
                        help=f"runs per column, each one cold start and its swaps (default "
                        f"{COLD_RUNS}, {QUICK_COLD_RUNS} with --quick): the cold row has N "
                        "samples")
    args = parser.parse_args()
    cold_runs = args.cold_runs or (QUICK_COLD_RUNS if args.quick else COLD_RUNS)
    swaps = QUICK_SWAPS if args.quick else SWAPS
    binary = find_llama_server()
    http()  # made before anything is timed
    order = [MODEL_NAMES[(i + 1) % 2] for i in range(swaps)]  # B, A, B, A ...
    results: dict[str, dict[str, list[float]]] = {
        c: {"cold": [], "swap": []} for c in ("direct", "router")}
    notes: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="model-swap-bench-") as tmp:
        folder = Path(tmp, "models")
        folder.mkdir()
        models = write_models(folder)
        log = Path(tmp, "bench.log")
        print(f"llama-server {binary}; models {', '.join(MODEL_NAMES)} "
              f"({os.path.getsize(models[MODEL_NAMES[0]]) / 1e6:.0f} MB each); "
              f"{cold_runs} cold runs, {swaps} swaps per run", flush=True)
        missing = llamanap_missing()
        if missing:
            notes["llamanap"] = missing
        else:
            results["llamanap"] = {"cold": [], "swap": []}
            results["agent"] = {"cold": [], "swap": []}
        # Runs alternate between the columns so drift on a shared machine hits each alike.
        for _ in range(cold_runs):
            first, *rest = direct(binary, models, [MODEL_NAMES[0], *order], log)
            results["direct"]["cold"].append(first)
            results["direct"]["swap"].extend(rest)
            time.sleep(SETTLE_S)
            first, *rest = router(binary, folder, [MODEL_NAMES[0], *order], log)
            results["router"]["cold"].append(first)
            results["router"]["swap"].extend(rest)
            if "llamanap" in results:
                time.sleep(SETTLE_S)
                run_dir = Path(tempfile.mkdtemp(dir=tmp))
                first, *rest = llamanap(binary, models, [MODEL_NAMES[0], *order], run_dir, log)
                results["llamanap"]["cold"].append(first)
                results["llamanap"]["swap"].extend(rest)
                time.sleep(SETTLE_S)
                run_dir = Path(tempfile.mkdtemp(dir=tmp))
                first, *rest = agent_alone(binary, models, [MODEL_NAMES[0], *order], run_dir, log)
                results["agent"]["cold"].append(first)
                results["agent"]["swap"].extend(rest)
            time.sleep(SETTLE_S)
    report(results, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
