"""edge-proxy benchmark: direct vs through edge-proxy vs through HAProxy, on loopback.

Run: ``.venv/bin/python benchmarks/edge_proxy_bench.py [--quick] [--engines loop,trio]``.
Prints one table; ``--engines`` picks the relay engines measured (a row each: ``edge-proxy`` is
the relay loop, ``edge-trio`` the pure-trio relay, see ``edge_proxy.tcp_routes.relay``).

Everything runs on 127.0.0.1: a threaded backend process, ``edge-proxy run`` as a real
process, HAProxy (``mode tcp``, the reference L4 proxy) when installed. Measured:

- single-stream throughput (one connection uploads ``STREAM_BYTES``);
- added latency p50/p99 of a 64-byte request/response at 1 and 64 concurrent connections
  (the proxy's percentiles minus the direct ones);
- new connections per second (connect, one round trip, close);
- the proxy's CPU (% of one core) while one stream is paced at a gigabit link's
  ``PACED_BYTES_S`` (what a LAN client can send; the number that matters on a small router);
- RSS of edge-proxy holding 10,000 connections for a sleeping node;
- time from the agent's ``ready`` to the held bytes' answer arriving at the client.

Targets: >= 1 GB/s, added p99 <= 2 ms at 64, 10,000 held under 200 MB, ready→delivered <= 50 ms.
The machine's cores are shared by client, proxy and backend, so treat the numbers as relative.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
TOKEN = "bench-token"
STREAM_BYTES = 2 << 30  # 2 GiB per throughput run
QUICK_STREAM_BYTES = 512 << 20
SEND_CHUNK = 1 << 20
ROUND_TRIPS = 2000  # per connection at concurrency 1
ROUND_TRIPS_64 = 300  # per connection at concurrency 64
LATENCY_REPEATS = 5  # rounds; medians over them
STREAM_REPEATS = 2  # the best of these (a throughput run can only be slowed by other work)
NEW_CONN_SECONDS = 3.0
NEW_CONN_THREADS = 4
HELD_CONNECTIONS = 10_000
READY_HELD = 100  # held clients released by one `ready`
READY_REPEATS = 5
START_TIMEOUT_S = 30.0
MSG = b"x" * 64
PACED_BYTES_S = 117e6  # 1 Gbit/s of TCP payload
PACED_SECONDS = 3.0
PACED_CHUNK = 64 * 1024
# `edge-proxy run` with a chosen relay engine (the CLI always runs the relay loop).
LAUNCH = ("import functools, sys, trio; from pathlib import Path; "
          "from edge_proxy.service import run_service; "
          "trio.run(functools.partial(run_service, Path(sys.argv[1]), relay_engine=sys.argv[2]))")
ENGINE_ROWS = {"loop": "edge-proxy", "trio": "edge-trio"}

# The backend: U = upload sink (replies with the byte count, a thread each), E = echo
# (one selector loop, so 64 echo connections cost no thread switching).
BACKEND = r"""
import selectors, socket, sys, threading
def upload(conn):
    with conn:
        buf = bytearray(1 << 20); total = 0
        while n := conn.recv_into(buf):
            total += n
        conn.sendall(total.to_bytes(8, "big"))
sel = selectors.DefaultSelector()
srv = socket.create_server(("127.0.0.1", int(sys.argv[1])), backlog=4096)
srv.setblocking(False)
sel.register(srv, selectors.EVENT_READ, None)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        sock = key.fileobj
        if sock is srv:
            try:
                conn, _ = srv.accept()
            except BlockingIOError:
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.setblocking(False)
            sel.register(conn, selectors.EVENT_READ, "new")
            continue
        if key.data == "new":  # the first byte says what the connection wants
            sel.unregister(sock)
            try:
                mode = sock.recv(1)
            except BlockingIOError:
                sel.register(sock, selectors.EVENT_READ, "new")
                continue
            except ConnectionError:
                mode = b""
            if mode == b"U":
                sock.setblocking(True)
                threading.Thread(target=upload, args=(sock,), daemon=True).start()
            elif mode == b"E":
                sel.register(sock, selectors.EVENT_READ, "echo")
            else:
                sock.close()
            continue
        try:
            data = sock.recv(65536)
        except (BlockingIOError, ConnectionError):
            data = b"" if not isinstance(sys.exc_info()[1], BlockingIOError) else None
        if data is None:
            continue
        if not data:
            sel.unregister(sock); sock.close(); continue
        sock.setblocking(True); sock.sendall(data); sock.setblocking(False)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        with contextlib.suppress(OSError):
            socket.create_connection((LOOPBACK, port), timeout=1).close()
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


@contextlib.contextmanager
def process(argv: list[str], port: int | None = None) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    try:
        if port is not None:
            wait_port(port, proc)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def edge_config(tmp: Path, listen: int, backend: int, control: int, wol: int, *,
                probe_interval_s: float = 1.0) -> Path:
    path = tmp / f"edge-{listen}.toml"
    path.write_text(f"""
log_level = "warning"
[control]
listen = "127.0.0.1:{control}"
token = "{TOKEN}"
[limits]
max_held_total = 20000
hold_buffer_bytes = 65536
[nodes.box]
host = "127.0.0.1"
mac = "aa:bb:cc:dd:ee:01"
wol = {{ broadcast = "127.0.0.1", port = {wol} }}
wol_interval_s = 5
wake_timeout_s = 600
probe_interval_s = {probe_interval_s}
probe_timeout_s = 0.5
max_held = 20000
[[routes]]
listen = "127.0.0.1:{listen}"
node = "box"
backend_port = {backend}
""")
    return path


def haproxy_config(tmp: Path, listen: int, backend: int) -> Path:
    path = tmp / "haproxy.cfg"
    path.write_text(f"""
global
    maxconn 9000  # two descriptors per connection must fit the open-file limit
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend fe
    bind 127.0.0.1:{listen}
    default_backend be
backend be
    server s1 127.0.0.1:{backend}
""")
    return path


# ---- measurements ----------------------------------------------------------------------

def throughput(port: int, total: int) -> float:
    """Bytes per second of one upload stream (the backend acknowledges the count)."""
    chunk = os.urandom(SEND_CHUNK)
    with socket.create_connection((LOOPBACK, port)) as s:
        s.sendall(b"U")
        start = time.perf_counter()
        sent = 0
        while sent < total:
            s.sendall(chunk)
            sent += len(chunk)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while len(got) < 8:
            part = s.recv(8 - len(got))
            if not part:
                raise RuntimeError("stream cut short")
            got += part
        elapsed = time.perf_counter() - start
    if int.from_bytes(got, "big") != sent:
        raise RuntimeError("byte count mismatch")
    return sent / elapsed


def round_trips(port: int, concurrency: int, count: int) -> list[float]:
    """Round-trip times (s) of 64-byte messages over ``concurrency`` connections, driven by
    one selector loop (threads would measure the client's GIL more than the proxy)."""
    sel = selectors.DefaultSelector()
    samples: list[float] = []
    started: dict[socket.socket, float] = {}
    left: dict[socket.socket, int] = {}
    for _ in range(concurrency):
        s = socket.create_connection((LOOPBACK, port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(b"E")
        left[s] = count
        sel.register(s, selectors.EVENT_READ)
    time.sleep(0.2)  # let every connection reach the backend before timing starts
    for s in left:
        started[s] = time.perf_counter()
        s.sendall(MSG)
    pending = {s: len(MSG) for s in left}
    while left:
        for key, _ in sel.select():
            conn = key.fileobj
            assert isinstance(conn, socket.socket)
            data = conn.recv(65536)
            if not data:
                raise RuntimeError("connection closed mid-benchmark")
            pending[conn] -= len(data)
            if pending[conn] > 0:
                continue
            now = time.perf_counter()
            samples.append(now - started[conn])
            left[conn] -= 1
            if left[conn] == 0:
                del left[conn]
                sel.unregister(conn)
                conn.close()
                continue
            pending[conn] = len(MSG)
            started[conn] = time.perf_counter()
            conn.sendall(MSG)
    return samples


def new_connections(port: int, seconds: float) -> float:
    """Connections per second: connect, one 64-byte round trip, close."""
    stop = time.monotonic() + seconds
    counts = [0] * NEW_CONN_THREADS

    def worker(i: int) -> None:
        while time.monotonic() < stop:
            with socket.create_connection((LOOPBACK, port)) as s:
                s.sendall(b"E" + MSG)
                got = 0
                while got < len(MSG):
                    got += len(s.recv(65536))
            counts[i] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(NEW_CONN_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / seconds


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def paced_cpu(port: int, pid: int | None) -> float:
    """% of one core the proxy (``pid``) spends while one upload is paced at PACED_BYTES_S."""
    chunk = os.urandom(PACED_CHUNK)
    with socket.create_connection((LOOPBACK, port)) as s:
        s.sendall(b"U")
        before = cpu_seconds(pid) if pid else 0.0
        start = time.perf_counter()
        sent = 0
        while (elapsed := time.perf_counter() - start) < PACED_SECONDS:
            ahead = sent / PACED_BYTES_S - elapsed
            if ahead > 0:
                time.sleep(ahead)
            s.sendall(chunk)
            sent += len(chunk)
        used = (cpu_seconds(pid) - before) if pid else 0.0
        s.shutdown(socket.SHUT_WR)
        while s.recv(8):
            pass
    return 100 * used / (time.perf_counter() - start)


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def control(port: int, method: str, path: str, body: dict[str, str] | None = None) -> object:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=10) as response:
        return json.loads(response.read())


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def wait_held(control_port: int, count: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S * 4
    while time.monotonic() < deadline:
        status = control(control_port, "GET", "/status")
        assert isinstance(status, dict)
        if status["nodes"]["box"]["held"] >= count:
            return
        time.sleep(0.1)
    raise RuntimeError(f"fewer than {count} connections held")


def held_rss(tmp: Path, wol: int) -> tuple[float, float]:
    """(idle RSS, RSS with HELD_CONNECTIONS held) of an edge-proxy whose node sleeps."""
    listen, backend, ctl = free_port(), free_port(), free_port()
    cfg = edge_config(tmp, listen, backend, ctl, wol, probe_interval_s=5)
    with process([sys.executable, "-m", "edge_proxy", "run", "-c", str(cfg)], ctl) as proc:
        idle = rss_mib(proc.pid)
        clients = []
        try:
            for _ in range(HELD_CONNECTIONS):
                s = socket.create_connection((LOOPBACK, listen))
                s.sendall(b"E" + MSG)
                clients.append(s)
            wait_held(ctl, HELD_CONNECTIONS)
            return idle, rss_mib(proc.pid)
        finally:
            for s in clients:
                s.close()


def ready_to_delivered(tmp: Path, wol: int, held: int) -> tuple[float, float]:
    """Seconds from `ready` (backend already listening) to the answer reaching the held
    clients: (first client, all ``held`` clients). Probes are slowed right down so only
    the event can explain a quick release."""
    listen, backend, ctl = free_port(), free_port(), free_port()
    cfg = edge_config(tmp, listen, backend, ctl, wol, probe_interval_s=60)
    argv = [sys.executable, "-m", "edge_proxy", "run", "-c", str(cfg)]
    with process(argv, ctl):
        clients = []
        for _ in range(held):
            s = socket.create_connection((LOOPBACK, listen))
            s.sendall(b"E" + MSG)
            clients.append(s)
        wait_held(ctl, held)
        with process([sys.executable, "-c", BACKEND, str(backend)], backend):
            arrivals: list[float] = []

            def read(s: socket.socket) -> None:
                got = 0
                while got < len(MSG):
                    got += len(s.recv(65536))
                arrivals.append(time.perf_counter())

            readers = [threading.Thread(target=read, args=(s,)) for s in clients]
            for t in readers:
                t.start()
            start = time.perf_counter()
            control(ctl, "POST", "/v1/events", {"event": "ready", "node": "box"})
            for t in readers:
                t.join(timeout=START_TIMEOUT_S)
            for s in clients:
                s.close()
        if len(arrivals) != held:
            raise RuntimeError("not every held client got its answer")
        return min(arrivals) - start, max(arrivals) - start


# ---- the run ---------------------------------------------------------------------------

def measure(ports: dict[str, int], pids: dict[str, int], stream_bytes: int
            ) -> dict[str, dict[str, float]]:
    """Every path measured in rounds, back to back: each round times direct, edge-proxy and
    haproxy one after the other, and the added latency is taken within a round (against that
    round's direct run), then the median over rounds. Load from elsewhere on a shared
    machine then shifts both sides of a difference alike instead of one path's whole run."""
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in ports}
    for _ in range(LATENCY_REPEATS):
        for name, port in ports.items():
            one = round_trips(port, 1, ROUND_TRIPS)
            many = round_trips(port, 64, ROUND_TRIPS_64)
            rounds[name].append({"p50_1": pct(one, 0.5) * 1e3, "p99_1": pct(one, 0.99) * 1e3,
                                 "p50_64": pct(many, 0.5) * 1e3, "p99_64": pct(many, 0.99) * 1e3,
                                 "cpu": paced_cpu(port, pids.get(name))})
    results: dict[str, dict[str, float]] = {}
    for name, port in ports.items():
        r = {key: statistics.median(rnd[key] for rnd in rounds[name]) for key in rounds[name][0]}
        for key in ("p50_1", "p99_1", "p50_64", "p99_64"):
            r["add" + key[1:]] = statistics.median(
                mine[key] - base[key] for mine, base in zip(rounds[name], rounds["direct"],
                                                            strict=True))
        r["gbps"] = max(throughput(port, stream_bytes) for _ in range(STREAM_REPEATS)) / 1e9
        r["conn_s"] = new_connections(port, NEW_CONN_SECONDS)
        results[name] = r
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller transfers (a smoke run)")
    parser.add_argument("--engines", default="loop",
                        help="relay engines to measure, comma-separated: loop, trio")
    parser.add_argument("--no-extras", action="store_true",
                        help="skip the held-connection RSS and ready->delivered runs")
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    stream_bytes = QUICK_STREAM_BYTES if args.quick else STREAM_BYTES
    with tempfile.TemporaryDirectory() as tmpdir, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as wol_sink:
        tmp = Path(tmpdir)
        wol_sink.bind((LOOPBACK, 0))  # magic packets land here and are never read
        wol = wol_sink.getsockname()[1]
        backend = free_port()
        with contextlib.ExitStack() as running:
            running.enter_context(process([sys.executable, "-c", BACKEND, str(backend)], backend))
            ports = {"direct": backend}
            pids: dict[str, int] = {}
            for engine in args.engines.split(","):
                listen, ctl = free_port(), free_port()
                cfg = edge_config(tmp, listen, backend, ctl, wol)
                proc = running.enter_context(
                    process([sys.executable, "-c", LAUNCH, str(cfg), engine], listen))
                wait_port(ctl)
                ports[ENGINE_ROWS[engine]] = listen
                pids[ENGINE_ROWS[engine]] = proc.pid
            exe = shutil.which("haproxy")
            if exe is not None:
                listen = free_port()
                proc = running.enter_context(
                    process([exe, "-f", str(haproxy_config(tmp, listen, backend))], listen))
                ports["haproxy"] = listen
                pids["haproxy"] = proc.pid
            results = measure(ports, pids, stream_bytes)
        print(f"{'path':<12} {'stream GB/s':>11} {'p50/p99 @1 ms':>16} {'added @1':>14} "
              f"{'p50/p99 @64 ms':>16} {'added @64':>14} {'conn/s':>8} {'CPU% @1Gb':>9}")
        for name, r in results.items():
            added1 = added64 = "-"
            if name != "direct":
                added1 = f"{r['add50_1']:+.3f}/{r['add99_1']:+.3f}"
                added64 = f"{r['add50_64']:+.3f}/{r['add99_64']:+.3f}"
            print(f"{name:<12} {r['gbps']:>11.2f} {r['p50_1']:>7.3f}/{r['p99_1']:<8.3f} "
                  f"{added1:>14} {r['p50_64']:>7.3f}/{r['p99_64']:<8.3f} {added64:>14} "
                  f"{r['conn_s']:>8.0f} {r['cpu'] if name != 'direct' else 0:>9.1f}")
        if "haproxy" not in results:
            print("haproxy not installed (apt-get install -y haproxy); its row is left out")
        if args.no_extras:
            return 0
        idle, held = held_rss(tmp, wol)
        print(f"edge-proxy RSS: {idle:.1f} MiB idle, {held:.1f} MiB with "
              f"{HELD_CONNECTIONS} held connections ({(held - idle) * 1024 / HELD_CONNECTIONS:.1f}"
              " KiB each)")
        single = sorted(ready_to_delivered(tmp, wol, 1)[0] for _ in range(READY_REPEATS))
        first, last = ready_to_delivered(tmp, wol, READY_HELD)
        print(f"ready -> delivered: {single[len(single) // 2] * 1e3:.1f} ms for one held client "
              f"(median of {READY_REPEATS}); with {READY_HELD} held: {first * 1e3:.1f} ms to the "
              f"first, {last * 1e3:.1f} ms to all")
    print(f"(stream: {stream_bytes >> 20} MiB upload, best of {STREAM_REPEATS}; latency: 64-byte echo, {ROUND_TRIPS} round "
          f"trips at 1 connection, {ROUND_TRIPS_64} each at 64, medians of {LATENCY_REPEATS} interleaved rounds; conn/s: {NEW_CONN_THREADS} threads "
          f"for {NEW_CONN_SECONDS:g} s; {os.cpu_count()} CPUs shared by client, proxy, backend)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
