"""Model swap benchmark: llama.cpp's router vs llamanap vs llama-server started by hand, on the
same two tiny models and the same llama-server build, side by side in one run.

Run: ``.venv/bin/python benchmarks/model_swap_bench.py [--quick]``. Prints one table.

Columns, all on 127.0.0.1:

- **direct**: the floor. ``llama-server -m MODEL`` is started by hand for every request (the
  previous one stopped first); time to first token is counted from the spawn, so it is
  llama-server's own start-and-load time plus its first token.
- **router**: ``llama-server --models-dir DIR --models-max 1`` (router mode, autoload on). It
  names each model by its file stem; a request for a model that is not loaded spawns a child
  for it and, past ``--models-max``, stops the least recently used one first.
- **llamanap**: edge-proxy + node-agent with a memory budget of one model and both instances
  ``load = "on-demand"``. Needs the agent's on-demand instances; where this tree's node config
  has no such key the column says so instead of measuring.

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

import httpx

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


@contextmanager
def process(command: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A child with its output in ``log``; SIGTERM, grace, SIGKILL, always waited for."""
    with log.open("ab") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(TERM_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_healthy(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.perf_counter() + START_TIMEOUT_S
    with httpx.Client(timeout=1.0) as client:
        while time.perf_counter() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"exited with {proc.returncode}; log: {log}")
            try:
                if client.get(f"http://{LOOPBACK}:{port}/health").status_code == 200:
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
    with httpx.Client(timeout=REQUEST_TIMEOUT_S) as client, client.stream(
            "POST", f"http://{LOOPBACK}:{port}/v1/chat/completions", json=body) as response:
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
    """Start llama-server by hand per request; time to first token counted from the spawn."""
    samples = []
    for name in order:
        port = free_port()
        start = time.perf_counter()
        with process([str(binary), "-m", str(models[name]), "--alias", name, "--host", LOOPBACK,
                      "--port", str(port), *LLAMA_ARGS], log) as proc:
            wait_healthy(port, proc, log)
            samples.append(first_token(port, name, since=start))
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
    for cls in vars(node).values():
        if dataclasses.is_dataclass(cls) and "load" in {f.name for f in dataclasses.fields(cls)}:
            return None
    return ("not run: this tree's node-agent has no on-demand instances "
            "(instances.NAME.load); it lands with the agent's on-demand work")


# ---- report --------------------------------------------------------------------------------

def p50(values: list[float]) -> float:
    return statistics.median(values)


def report(results: dict[str, dict[str, list[float]]], notes: dict[str, str]) -> None:
    columns = ["direct", "router", "llamanap"]
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
        print(f"targets: overhead {over:.1f} ms p50 (<= 30: {'met' if over <= 30 else 'MISSED'});"
              f" cold no worse than the router: {'met' if cold_ok else 'MISSED'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs")
    args = parser.parse_args()
    cold_runs = QUICK_COLD_RUNS if args.quick else COLD_RUNS
    swaps = QUICK_SWAPS if args.quick else SWAPS
    binary = find_llama_server()
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
        # Runs alternate between the columns so drift on a shared machine hits each alike.
        for _ in range(cold_runs):
            first, *rest = direct(binary, models, [MODEL_NAMES[0], *order], log)
            results["direct"]["cold"].append(first)
            results["direct"]["swap"].extend(rest)
            first, *rest = router(binary, folder, [MODEL_NAMES[0], *order], log)
            results["router"]["cold"].append(first)
            results["router"]["swap"].extend(rest)
        missing = llamanap_missing()
        if missing:
            notes["llamanap"] = missing
    report(results, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
