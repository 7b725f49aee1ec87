"""Edge-proxy memory over a long run: 100,000 requests through an HTTP route with history on.

Run: ``.venv/bin/python benchmarks/proxy_memory_bench.py [--requests N] [--clients C]``.
Prints one table: the proxy's RSS after each tenth of the run, the history rows written, and
whether memory stayed bounded (target: what the proxy holds does not grow with the number of
requests it has served).

Everything runs on 127.0.0.1: the real llama-server on the tiny model, ``edge-proxy run`` as
its own process with ``[history]`` on, and ``C`` client threads, each on a kept connection,
alternating a plain answer (one token) and a streamed one (four tokens), so both the relayed
and the passed-through paths, the request rows and the timings parser are exercised.
"""

from __future__ import annotations

import argparse
import json
import socket
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

import h11

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_route_bench import (
    LLAMA_ARGS,
    LOOPBACK,
    RECV_BYTES,
    free_port,
    process,
    wait_http,
    write_config,
)

from shared.llama_bin import find_llama_server
from shared.tiny_gguf import TinyModelSpec, write_tiny_model

REQUESTS, CLIENTS = 100_000, 4
STEPS = 10  # RSS samples over the run
# Bounded: after the first tenth (caches, pools and the allocator warmed up), RSS grows by
# less than this over the rest of the run.
MAX_GROWTH_MIB = 8.0
PLAIN = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 1}).encode()
STREAMED = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": 4, "ignore_eos": True, "stream": True}).encode()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class Client:
    """One kept connection; ``ask`` sends a request and reads the whole answer."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._open()

    def _open(self) -> None:
        self.sock = socket.create_connection((LOOPBACK, self.port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn = h11.Connection(h11.CLIENT)

    def ask(self, body: bytes) -> None:
        conn = self.conn
        head = conn.send(h11.Request(method="POST", target="/v1/chat/completions", headers=[
            ("host", "bench"), ("content-type", "application/json"),
            ("content-length", str(len(body)))])) or b""
        self.sock.sendall(head + (conn.send(h11.Data(data=body)) or b"")
                          + (conn.send(h11.EndOfMessage()) or b""))
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(self.sock.recv(RECV_BYTES))
            elif isinstance(event, h11.Response) and event.status_code != 200:
                raise RuntimeError(f"answer {event.status_code}")
            elif isinstance(event, h11.EndOfMessage):
                break
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        else:  # the proxy closed it (it does not, but a client must cope)
            self.sock.close()
            self._open()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=REQUESTS)
    parser.add_argument("--clients", type=int, default=CLIENTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="proxy-memory-bench-") as tmp:
        folder = Path(tmp)
        model = write_tiny_model(folder / "tiny.gguf", TinyModelSpec())
        backend_port, proxy_port = free_port(), free_port()
        db = folder / "history.sqlite3"
        llama_cmd = [str(find_llama_server()), "-m", str(model), "--host", LOOPBACK,
                     "--port", str(backend_port), *LLAMA_ARGS]
        proxy_cmd = [sys.executable, "-m", "edge_proxy", "run", "-c",
                     str(write_config(folder, proxy_port, backend_port, db))]
        with process(llama_cmd, folder / "llama.log") as llama:
            wait_http(backend_port, "/health", llama, folder / "llama.log")
            with process(proxy_cmd, folder / "proxy.log") as proxy:
                wait_http(proxy_port, "/health", proxy, folder / "proxy.log", fresh=True)
                samples = run(proxy.pid, proxy_port, args.requests, args.clients)
        with sqlite3.connect(db) as conn:
            rows = conn.execute("SELECT count(*) FROM requests").fetchone()[0]
    report(samples, rows, args.requests)
    return 0


def run(pid: int, port: int, total: int, clients: int) -> list[tuple[int, float, float]]:
    """(requests done, RSS MiB, seconds) after each of ``STEPS`` parts of the run."""
    step = total // STEPS
    samples = [(0, rss_mib(pid), 0.0)]
    began = time.perf_counter()
    for part in range(STEPS):
        def work(n: int) -> None:
            client = Client(port)
            for i in range(n):
                client.ask(STREAMED if i % 2 else PLAIN)
            client.sock.close()

        threads = [threading.Thread(target=work, args=(step // clients,))
                   for _ in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        done = (part + 1) * (step // clients) * clients
        samples.append((done, rss_mib(pid), time.perf_counter() - began))
    return samples


def report(samples: list[tuple[int, float, float]], rows: int, total: int) -> None:
    print(f"\nedge-proxy with history on, {total:,} requests (half streamed), "
          "tiny model, llama-server -t 1\n")
    print(f"{'requests':>10} {'RSS MiB':>9} {'seconds':>9} {'req/s':>8}")
    print("-" * 39)
    previous = (0, 0.0)
    for done, rss, seconds in samples:
        rate = (done - previous[0]) / (seconds - previous[1]) if seconds > previous[1] else 0
        print(f"{done:10,d} {rss:9.1f} {seconds:9.1f} {rate:8.0f}")
        previous = (done, seconds)
    warm, last = samples[1][1], samples[-1][1]
    verdict = "met" if last - warm <= MAX_GROWTH_MIB else "not met"
    print(f"\nhistory rows written: {rows:,}")
    print(f"RSS after the first tenth {warm:.1f} MiB, at the end {last:.1f} MiB: grew "
          f"{last - warm:+.1f} MiB over {samples[-1][0] - samples[1][0]:,} requests "
          f"(target: bounded, < {MAX_GROWTH_MIB:g} MiB growth): {verdict}")


if __name__ == "__main__":
    raise SystemExit(main())
