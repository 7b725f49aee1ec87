"""node-agent overhead with idle real llama-server instances, and crash-to-respawn time.

Starts ``node-agent run`` as a real process supervising N llama-server instances (tiny
generated model, CPU), waits until all are READY, then measures the agent process only:

- RSS once everything is READY, and CPU time over ``--seconds`` of idling (% of one core);
- for each instance in turn: SIGKILL it, then the time until the agent has spawned its
  replacement ("respawn begins") and until the API reports it READY again.

Targets: RSS <= 60 MB, idle CPU <= 1 %, respawn begins <= 1 s after the crash.

    .venv/bin/python benchmarks/supervisor_bench.py [--instances 4] [--seconds 60]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import tomli_w

from shared.llama_bin import find_llama_server
from shared.tiny_gguf import TinyModelSpec, write_tiny_model

REPO = Path(__file__).resolve().parent.parent
LLAMA_ARGS = ["-c", "256", "-np", "1", "-t", "1"]
READY_TIMEOUT_S = 120.0
API_POLL_S = 0.02  # READY is read from the API, so this bounds the READY time's resolution
SPAWN_POLL_S = 0.002  # the replacement child is looked for this often
TARGET_RSS_MB = 60.0
TARGET_CPU_PCT = 1.0
TARGET_RESPAWN_S = 1.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def write_config(folder: Path, n: int) -> tuple[Path, int]:
    model = write_tiny_model(folder / "tiny.gguf", TinyModelSpec())
    binary = find_llama_server()
    api_port = free_port()
    instances = {f"tiny{i}": {"binary": str(binary), "model": str(model), "port": free_port(),
                              "args": LLAMA_ARGS} for i in range(n)}
    config = folder / "node-agent.toml"
    config.write_text(tomli_w.dumps({
        "agent": {"api_listen": f"127.0.0.1:{api_port}", "state_file": str(folder / "state.toml")},
        "power": {"enabled": False}, "pstate": {"enabled": False}, "instances": instances,
    }))
    return config, api_port


def rows(client: httpx.Client) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in client.get("/v1/instances").json()["instances"]}


def wait_until(predicate: Any, timeout_s: float, poll_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"supervisor_bench: timed out waiting for {what}")
        time.sleep(poll_s)


def measure(n: int, seconds: float) -> list[tuple[str, str, str]]:
    with tempfile.TemporaryDirectory(prefix="supervisor-bench-") as tmp:
        config, api_port = write_config(Path(tmp), n)
        agent = subprocess.Popen([sys.executable, "-m", "inference_node", "run", "--config", str(config)],
                                 cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        proc = psutil.Process(agent.pid)
        client = httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=10)
        try:
            def api_up() -> bool:
                try:
                    return len(rows(client)) == n
                except httpx.HTTPError:
                    return False

            wait_until(api_up, READY_TIMEOUT_S, 0.1, "the API")
            wait_until(lambda: all(r["state"] == "ready" for r in rows(client).values()),
                       READY_TIMEOUT_S, 0.1, "all instances READY")
            time.sleep(1.0)  # let start-up work settle before measuring idle
            rss_mb = proc.memory_info().rss / 2**20
            before, t0 = proc.cpu_times(), time.monotonic()
            time.sleep(seconds)
            after, t1 = proc.cpu_times(), time.monotonic()
            busy = (after.user - before.user) + (after.system - before.system)
            cpu_pct = 100.0 * busy / (t1 - t0)
            rss_idle_mb = proc.memory_info().rss / 2**20

            respawn, ready = [], []
            for name, row in rows(client).items():
                old = row["pid"]
                known = {r["pid"] for r in rows(client).values()}  # includes the one to kill
                os.kill(old, signal.SIGKILL)
                killed_at = time.monotonic()

                def spawned(known: set[int] = known) -> bool:
                    return any(c.pid not in known for c in proc.children())

                wait_until(spawned, READY_TIMEOUT_S, SPAWN_POLL_S, f"{name} to respawn")
                respawn.append(time.monotonic() - killed_at)
                wait_until(lambda name=name, old=old: (r := rows(client)[name])["state"] == "ready"
                           and r["pid"] != old, READY_TIMEOUT_S, API_POLL_S, f"{name} READY again")
                ready.append(time.monotonic() - killed_at)
            rss_after_mb = proc.memory_info().rss / 2**20
        finally:
            client.close()
            agent.send_signal(signal.SIGTERM)
            agent.wait(timeout=60)

    def ms(values: list[float]) -> str:
        return f"median {statistics.median(values) * 1000:.0f} ms, max {max(values) * 1000:.0f} ms"

    return [
        (f"agent RSS, {n} instances READY", f"{rss_mb:.1f} MB (after idle {rss_idle_mb:.1f}, "
         f"after crashes {rss_after_mb:.1f})", f"<= {TARGET_RSS_MB:g} MB"),
        (f"agent CPU idle over {seconds:g} s", f"{cpu_pct:.2f} % of one core",
         f"<= {TARGET_CPU_PCT:g} %"),
        (f"SIGKILL -> respawn begins (x{len(respawn)})", ms(respawn),
         f"<= {TARGET_RESPAWN_S * 1000:.0f} ms"),
        (f"SIGKILL -> READY again (x{len(ready)})", ms(ready), "-"),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=60.0, help="idle CPU window")
    args = parser.parse_args()
    table = measure(args.instances, args.seconds)
    widths = [max(len(r[i]) for r in table) for i in range(2)]
    print(f"{'metric':<{widths[0]}}  {'measured':<{widths[1]}}  target")
    for metric, value, target in table:
        print(f"{metric:<{widths[0]}}  {value:<{widths[1]}}  {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
