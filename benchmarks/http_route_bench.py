"""HTTP route benchmark: streaming chat completions through an edge-proxy HTTP route vs
directly to llama-server, on the tiny model, side by side in one run.

Run: ``.venv/bin/python benchmarks/http_route_bench.py [--quick]``. Prints one table.

Everything runs on 127.0.0.1: llama-server (the real one, tiny model, one thread), ``edge-proxy
run`` as its own process with one ``protocol = "http"`` route, and a blocking h11 client in
this process. Direct and proxied requests alternate, so drift on the shared machine hits both
alike. Per request: time to first chunk (request written → first ``data:`` event read) and
chunks per second (events after the first / time from the first to the last). Both paths use
a new client connection per request (llama-server closes one after a streamed answer), timed
from connect; "idle proxy" rows first wait out the proxy's upstream keep-alive expiry.

Also printed: the proxy's CPU time per streamed chunk (it competes with llama-server and the
client for this machine's cores; on a real deployment it runs on another box). A second proxy
with ``[history]`` on serves the same requests, interleaved, so what history costs the relay
is read side by side.

Targets: added time to first chunk <= 1 ms p50; no loss in chunks per second; the proxy's
CPU per streamed chunk <= 40 us (the always-on box is often a Raspberry Pi, several times
slower); history on costs <= 0.2 ms p50 to the first chunk and keeps >= 98 % of
history-off's chunks per second.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import h11
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edge_proxy.http_routes.upstream import UPSTREAM_KEEPALIVE_EXPIRY_S  # noqa: E402
from shared.llama_bin import find_llama_server  # noqa: E402
from shared.tiny_gguf import TinyModelSpec, write_tiny_model  # noqa: E402

LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 60.0
POLL_S = 0.05
TOKENS = 200  # per streamed answer (ignore_eos: always this many)
RUNS, QUICK_RUNS = 40, 10  # per path, interleaved
COLD_RUNS, QUICK_COLD_RUNS = 5, 2
WARMUP = 3
RECV_BYTES = 1 << 16
LLAMA_ARGS = ("-c", "2048", "-np", "1", "-t", "1", "--alias", "tiny")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Sample:
    ttfc_s: float
    chunks_per_s: float


class KeptConnection:
    """A client connection kept across requests (as SDKs and web UIs keep theirs)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((LOOPBACK, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn = h11.Connection(h11.CLIENT)

    def stream(self, body: bytes) -> Sample:
        start = time.perf_counter()
        sample = _exchange(self.sock, self.conn, body, start)
        self.conn.start_next_cycle()  # raises if either side did not keep the connection
        return sample


def stream(port: int, body: bytes) -> Sample:
    """One streamed request on a new connection (llama-server closes a connection after a
    streamed answer, so a client cannot keep one open to it)."""
    start = time.perf_counter()
    with socket.create_connection((LOOPBACK, port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _exchange(sock, h11.Connection(h11.CLIENT), body, start)


def _exchange(sock: socket.socket, conn: h11.Connection, body: bytes, start: float) -> Sample:
    headers = [(b"host", b"bench"), (b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    data = conn.send(h11.Request(method="POST", target="/v1/chat/completions",
                                 headers=headers))
    sock.sendall(data + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
    first = last = 0.0
    events = 0
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(sock.recv(RECV_BYTES))
        elif isinstance(event, h11.Response):
            assert event.status_code == 200, event
        elif isinstance(event, h11.Data):
            n = bytes(event.data).count(b"data: ")
            if n:
                last = time.perf_counter()
                if not events:
                    first = last
                events += n
        elif isinstance(event, h11.EndOfMessage):
            break
    assert events > TOKENS // 2, events
    return Sample(first - start, (events - 1) / (last - first))


@contextmanager
def process(command: list[str], log: Path, cpus: set[int] | None = None
            ) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    if cpus:
        os.sched_setaffinity(proc.pid, cpus)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_http(port: int, path: str, proc: subprocess.Popen[bytes], log: Path,
              fresh: bool = False) -> None:
    """Until GET path answers 200 (``fresh``: and not from the proxy's cache)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{proc.args[0]} exited:\n{log.read_text()[-3000:]}")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=1) as s:
                s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
                answer = b""
                while chunk := s.recv(RECV_BYTES):
                    answer += chunk
            head = answer.split(b"\r\n\r\n", 1)[0].lower()
            if head.startswith(b"http/1.1 200") and not (fresh and b"x-llamanap-cached" in head):
                return
        except OSError:
            pass
        time.sleep(POLL_S)
    sys.exit(f"port {port} not ready after {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def write_config(folder: Path, proxy_port: int, backend_port: int,
                 history: Path | None = None) -> Path:
    path = folder / ("edge-history.toml" if history else "edge.toml")
    history_section = (f'[history]\nenabled = true\npath = "{history}"\n' if history else "")
    path.write_text(f"""
log_level = "warning"
{history_section}[control]
listen = "127.0.0.1:{free_port()}"
[nodes.box]
host = "127.0.0.1"
mac = "aa:bb:cc:dd:ee:01"
wol = {{ broadcast = "127.0.0.1", port = {free_port()} }}
probe_interval_s = 0.2
[[routes]]
listen = "127.0.0.1:{proxy_port}"
node = "box"
backend_port = {backend_port}
ready = "http:/health"
protocol = "http"
""")
    return path


def haproxy_config(folder: Path, listen: int, backend: int) -> Path:
    """HAProxy in HTTP mode in front of llama-server: the peer for what a relay in C adds."""
    path = folder / "haproxy.cfg"
    path.write_text(f"""
defaults
    mode http
    # forward each chunk at once, as an SSE stream needs (HAProxy otherwise waits to fill
    # its buffers, and the first token arrives with the last)
    option http-no-delay
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend fe
    bind {LOOPBACK}:{listen}
    default_backend be
backend be
    server s1 {LOOPBACK}:{backend}
""")
    return path


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs")
    parser.add_argument("--pin", action="store_true",
                        help="edge-proxy alone on the last CPU; llama-server and the client on "
                        "the others (as when the proxy runs on a box of its own)")
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    proxy_cpus = {cpus[-1]} if args.pin and len(cpus) > 1 else None
    others = set(cpus[:-1]) if proxy_cpus else None
    if others:
        os.sched_setaffinity(0, others)  # the client, and llama-server started from here
    runs = QUICK_RUNS if args.quick else RUNS
    cold_runs = QUICK_COLD_RUNS if args.quick else COLD_RUNS
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": TOKENS, "ignore_eos": True, "stream": True}).encode()
    with tempfile.TemporaryDirectory(prefix="http-route-bench-") as tmp:
        folder = Path(tmp)
        model = write_tiny_model(folder / "tiny.gguf", TinyModelSpec())
        backend_port, proxy_port, history_port = free_port(), free_port(), free_port()
        llama_cmd = [str(find_llama_server()), "-m", str(model), "--host", LOOPBACK,
                     "--port", str(backend_port), *LLAMA_ARGS]
        proxy_cmd = [sys.executable, "-m", "edge_proxy", "run", "-c",
                     str(write_config(folder, proxy_port, backend_port))]
        history_cmd = [sys.executable, "-m", "edge_proxy", "run", "-c",
                       str(write_config(folder, history_port, backend_port,
                                        folder / "history.sqlite3"))]
        with process(llama_cmd, folder / "llama.log", others) as llama:
            wait_http(backend_port, "/health", llama, folder / "llama.log")
            haproxy_exe = shutil.which("haproxy")
            haproxy_port = free_port()
            with process(proxy_cmd, folder / "proxy.log", proxy_cpus) as proxy, \
                    process(history_cmd, folder / "proxy-history.log", proxy_cpus) as hproxy, \
                    contextlib.ExitStack() as peers:
                wait_http(proxy_port, "/health", proxy, folder / "proxy.log", fresh=True)
                wait_http(history_port, "/health", hproxy, folder / "proxy-history.log",
                          fresh=True)
                kept = KeptConnection(proxy_port)
                paths: dict[str, Callable[[bytes], Sample]] = {
                    "direct": partial(stream, backend_port),
                    "proxy": partial(stream, proxy_port),
                    "proxy, client keeps its connection": kept.stream,
                    "proxy, history on": partial(stream, history_port),
                }
                haproxy_cpu: psutil.Process | None = None
                if haproxy_exe:
                    command = [haproxy_exe, "-f", str(haproxy_config(folder, haproxy_port,
                                                                     backend_port))]
                    peer = peers.enter_context(process(command, folder / "haproxy.log",
                                                       proxy_cpus))
                    wait_http(haproxy_port, "/health", peer, folder / "haproxy.log")
                    paths["haproxy (http mode)"] = partial(stream, haproxy_port)
                    haproxy_cpu = psutil.Process(peer.pid)
                else:
                    print("haproxy not installed (apt-get install -y haproxy); its row is "
                          "left out")
                for _ in range(WARMUP):
                    for run in paths.values():
                        run(body)
                results: dict[str, list[Sample]] = {name: [] for name in paths}
                proxy_cpu, history_cpu = psutil.Process(proxy.pid), psutil.Process(hproxy.pid)
                cpu_before = sum(proxy_cpu.cpu_times()[:2])
                haproxy_before = sum(haproxy_cpu.cpu_times()[:2]) if haproxy_cpu else 0.0
                history_before = sum(history_cpu.cpu_times()[:2])
                for i in range(runs):
                    for name in sorted(paths, reverse=bool(i % 2)):
                        results[name].append(paths[name](body))
                cpu_s = sum(proxy_cpu.cpu_times()[:2]) - cpu_before
                history_cpu_s = sum(history_cpu.cpu_times()[:2]) - history_before
                haproxy_cpu_s = (sum(haproxy_cpu.cpu_times()[:2]) - haproxy_before
                                 if haproxy_cpu else None)
                cold: list[Sample] = []
                for _ in range(cold_runs):
                    time.sleep(UPSTREAM_KEEPALIVE_EXPIRY_S * 1.5)  # the proxy's pool empties
                    cold.append(stream(proxy_port, body))
                results["proxy, after idle"] = cold
    report(results, runs)
    per_chunk_us = cpu_s / (2 * runs * TOKENS) * 1e6  # the two interleaved proxy paths
    rate = statistics.median(s.chunks_per_s for s in results["direct"])
    print(f"edge-proxy CPU (user+system) per streamed chunk: {per_chunk_us:.0f} us, i.e. "
          f"{per_chunk_us * rate / 1e4:.0f}% of one core at direct's {rate:.0f} chunks/s "
          f"(a real model streams 20-150 tokens/s; target <= 40 us)")
    print(f"edge-proxy with history on, CPU per streamed chunk: "
          f"{history_cpu_s / (runs * TOKENS) * 1e6:.0f} us")
    if haproxy_cpu_s is not None:
        print(f"haproxy (http mode), CPU per streamed chunk: "
              f"{haproxy_cpu_s / (runs * TOKENS) * 1e6:.0f} us")
    return 0


def report(results: dict[str, list[Sample]], runs: int) -> None:
    print(f"\nstreamed chat completions, {TOKENS} chunks each, tiny model, "
          f"{runs} interleaved runs per path (llama-server -t 1, 2-core machine)\n")
    header = (f"{'path':36} {'runs':>4}  {'TTFC p50':>9} {'TTFC p90':>9}  "
              f"{'chunks/s p50':>12} {'chunks/s min':>12}")
    print(header)
    print("-" * len(header))
    for name, samples in results.items():
        ttfc = [s.ttfc_s * 1000 for s in samples]
        rate = [s.chunks_per_s for s in samples]
        p90 = f"{pct(ttfc, 90):7.2f}ms" if len(ttfc) >= 4 else f"{'-':>9}"
        print(f"{name:36} {len(samples):4d}  {statistics.median(ttfc):7.2f}ms {p90}  "
              f"{statistics.median(rate):12.0f} {min(rate):12.0f}")
    d = [s.ttfc_s * 1000 for s in results["direct"]]
    rate_d = statistics.median(s.chunks_per_s for s in results["direct"])
    print()
    for name in ("proxy", "proxy, client keeps its connection", "haproxy (http mode)"):
        if name not in results:
            continue
        p = [s.ttfc_s * 1000 for s in results[name]]
        paired = [b - a for a, b in zip(d, p, strict=True)]
        rate_p = statistics.median(s.chunks_per_s for s in results[name])
        print(f"{name}: added time to first chunk p50 {statistics.median(p) - statistics.median(d):.2f}"
              f" ms (paired {statistics.median(paired):.2f} ms; target <= 1 ms); chunks/s "
              f"{rate_p / rate_d * 100:.1f}% of direct (target: no loss)")
    off = [s.ttfc_s * 1000 for s in results["proxy"]]
    on = [s.ttfc_s * 1000 for s in results["proxy, history on"]]
    paired = [b - a for a, b in zip(off, on, strict=True)]
    rate_off = statistics.median(s.chunks_per_s for s in results["proxy"])
    rate_on = statistics.median(s.chunks_per_s for s in results["proxy, history on"])
    print(f"history on vs off: added time to first chunk p50 "
          f"{statistics.median(on) - statistics.median(off):.2f} ms (paired "
          f"{statistics.median(paired):.2f} ms; target <= 0.2 ms); chunks/s "
          f"{rate_on / rate_off * 100:.1f}% of history off (target >= 98%)")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
