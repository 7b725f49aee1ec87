"""A tiny real HTTP server to supervise in tests (stdlib only, so it starts fast).

Run as a program: ``python toy_server.py --port N [options]``. It answers ``GET /health``
with 503 until ``--ready-after`` seconds passed, then 200; it can ignore SIGTERM, spawn a
grandchild in its process group, flood its output, print given log lines, or exit on its own.
"""

from __future__ import annotations

import argparse
import http.server
import os
import signal
import subprocess
import sys
import threading
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--ready-after", type=float, default=0.0)
    parser.add_argument("--ignore-term", action="store_true")
    parser.add_argument("--grandchild", action="store_true", help="spawn a sleeper that ignores SIGTERM")
    parser.add_argument("--flood-lines", type=int, default=0, help="print this many lines first")
    parser.add_argument("--exit-after", type=float, default=None)
    parser.add_argument("--exit-code", type=int, default=1)
    parser.add_argument("--pidfile", default=None, help="append the grandchild's pid here")
    parser.add_argument("--say", action="append", default=[],
                        help="print this line on stderr at start (a llama-server log line)")
    args = parser.parse_args()
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.grandchild:
        code = "import signal,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(3600)"
        kid = subprocess.Popen([sys.executable, "-c", code])
        if args.pidfile:
            with open(args.pidfile, "a") as fh:
                fh.write(f"{kid.pid}\n")
    for line in args.say:
        print(line, file=sys.stderr, flush=True)
    for i in range(args.flood_lines):
        print(f"flood line {i} " + "x" * 100, file=sys.stderr if i % 2 else sys.stdout)
    started = time.monotonic()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ready = time.monotonic() - started >= args.ready_after
            status = 200 if ready or self.path != "/health" else 503
            body = b'{"status":"ok"}' if status == 200 else b'{"status":"loading"}'
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt: str, *a: object) -> None:
            print(f"request {self.path}", file=sys.stderr, flush=True)

    server = http.server.ThreadingHTTPServer((args.host, args.port), Handler)
    print(f"toy server pid {os.getpid()} listening on {args.host}:{args.port}", flush=True)
    if args.exit_after is not None:
        def leave() -> None:
            time.sleep(args.exit_after)
            print(f"toy server exiting with {args.exit_code}", file=sys.stderr, flush=True)
            os._exit(args.exit_code)

        threading.Thread(target=leave, daemon=True).start()
    server.serve_forever()


if __name__ == "__main__":
    main()
