"""The whole stack on localhost, no GPU, no root: ``python -m inference_node.demo``.

It writes a tiny GGUF model, an edge-proxy config and a node-agent config into a temporary
folder, starts both services as real processes, and prints what to type. The "GPU box" is this
machine: its suspend command is ``node-agent simulate-sleep``, which returns at once like
``systemctl suspend`` and leaves behind a process that ignores everything until a magic packet
for the node's MAC reaches a UDP port on 127.0.0.1 (the agent has already stopped llama-server,
so connections to the "node" are refused meanwhile), then reports the resume through the agent's
API, as the system-sleep hook does on a real machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import tomli_w
import trio

from shared.tiny_gguf import DEMO_SENTENCE, PRESETS, write_tiny_model

DEMO_MAC = "02:6c:6c:6e:61:70"  # locally administered, never a real NIC
DEMO_NODE = "demo-box"
STARTUP_TIMEOUT_S = 60.0
SELF_TEST_WAKE_TIMEOUT_S = 120.0
# Log lines worth showing a person watching the demo; everything else goes to the log files.
INTERESTING = re.compile(r"->|power:|wake|magic|suspend|resum|ready|READY|listening|error|ERROR", re.I)


def _free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_demo_files(folder: Path, *, idle_timeout_s: float, listen_port: int) -> dict[str, object]:
    """Write the model, token and both configs; return the ports and paths chosen."""
    model = write_tiny_model(folder / "tiny-llama.gguf", PRESETS["llama-sentence"])
    token = folder / "control.token"
    token.write_text(os.urandom(16).hex() + "\n")
    token.chmod(0o600)
    ports = {"listen": listen_port, "backend": _free_port(), "control": _free_port(),
             "api": _free_port(), "wol": _free_port(socket.SOCK_DGRAM)}
    edge = {
        "log_level": "info",
        "control": {"listen": f"127.0.0.1:{ports['control']}", "token_file": str(token)},
        "nodes": {DEMO_NODE: {
            "host": "127.0.0.1", "mac": DEMO_MAC,
            "wol": {"broadcast": "127.0.0.1", "port": ports["wol"]},
            "wol_interval_s": 1.0, "wake_timeout_s": 120.0,
            "probe_interval_s": 0.25, "probe_timeout_s": 0.5,
        }},
        "routes": [{"listen": f"127.0.0.1:{ports['listen']}", "node": DEMO_NODE,
                    "backend_port": ports["backend"], "ready": "http:/health"}],
        "history": {"enabled": True, "path": str(folder / "history.sqlite3")},
    }
    agent_cfg = folder / "node-agent.toml"
    agent = {
        "log_level": "info",
        "agent": {"node": DEMO_NODE, "api_listen": f"127.0.0.1:{ports['api']}",
                  "token_file": str(token), "state_file": str(folder / "state.toml")},
        "proxy": {"url": f"http://127.0.0.1:{ports['control']}", "token_file": str(token)},
        "power": {
            "idle_timeout_s": idle_timeout_s, "min_awake_s": 2.0, "check_interval_s": 0.5,
            "suspend_command": [sys.executable, "-m", "inference_node", "simulate-sleep",
                                "--mac", DEMO_MAC, "--listen", f"127.0.0.1:{ports['wol']}",
                                "--config", str(agent_cfg), "--log", str(folder / "sleep.log")],
            # A "sleep" lasts until someone sends a request, however long that takes.
            "resume_timeout_s": 7 * 86400.0,
            "watch_foreign_gpu_processes": False,
        },
        "instances": {"tiny": {"model": str(model), "port": ports["backend"],
                               "args": ["-c", "1024", "-np", "2", "-lv", "4", "--metrics"]}},
    }
    (folder / "edge-proxy.toml").write_text(tomli_w.dumps(edge))
    agent_cfg.write_text(tomli_w.dumps(agent))
    return {"ports": ports, "edge": folder / "edge-proxy.toml", "agent": agent_cfg, "token": token}


async def _pump(name: str, proc: trio.Process, logfile: Path, verbose: bool) -> None:
    assert proc.stderr is not None
    buf = b""
    with logfile.open("ab") as out:
        async for chunk in proc.stderr:
            out.write(chunk)
            out.flush()
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace")
                if verbose or INTERESTING.search(line):
                    print(f"[{name}] {line}", flush=True)


def _banner(info: dict[str, object], folder: Path) -> str:
    ports = info["ports"]
    assert isinstance(ports, dict)
    url = f"http://127.0.0.1:{ports['listen']}"
    body = json.dumps({"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 24,
                       "temperature": 0})
    return f"""
llamanap demo — everything on 127.0.0.1, files in {folder}

  edge-proxy  {url}  ->  llama-server on port {ports['backend']} (node {DEMO_NODE})
  node-agent  API on port {ports['api']}; the node suspends after idle, and wakes on a
              magic packet to UDP 127.0.0.1:{ports['wol']}
  dashboard   http://127.0.0.1:{ports['control']}/  (the page asks for the token in {info['token']})

Try, in another terminal:
  curl -s {url}/v1/chat/completions -H 'content-type: application/json' -d '{body}'
  .venv/bin/edge-proxy status --config {info['edge']}
  .venv/bin/edge-proxy history --config {info['edge']}     # wakes, held time (also once stopped)
  .venv/bin/edge-proxy energy --config {info['edge']}
  .venv/bin/node-agent status --config {info['agent']}

The model is a generated tiny one built to answer every prompt with: {DEMO_SENTENCE}
Watch below: the node goes to sleep when idle; the next curl wakes it. Ctrl-C stops the demo.
"""


async def _wait_for(url: str, token: str, check: Callable[[Any], bool], timeout_s: float) -> None:
    """Poll a JSON endpoint of the agent until ``check(data)`` holds."""
    headers = {"authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(timeout=5) as client:
        with trio.fail_after(timeout_s):
            while True:
                try:
                    if check((await client.get(url, headers=headers)).json()):
                        return
                except (httpx.HTTPError, ValueError, KeyError, TypeError):
                    pass
                await trio.sleep(0.2)


def _all_ready(data: Any) -> bool:
    return bool(data["instances"]) and all(i["state"] in ("READY", "ready") for i in data["instances"])


async def _chat(url: str) -> tuple[float, str]:
    body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16,
            "temperature": 0}
    t0 = time.monotonic()
    async with httpx.AsyncClient(timeout=SELF_TEST_WAKE_TIMEOUT_S) as client:
        r = await client.post(url + "/v1/chat/completions", json=body)
    r.raise_for_status()
    return time.monotonic() - t0, r.json()["choices"][0]["message"]["content"]


async def run_demo(args: argparse.Namespace) -> int:
    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="llamanap-demo-"))
    folder.mkdir(parents=True, exist_ok=True)
    info = write_demo_files(folder, idle_timeout_s=args.idle_timeout_s, listen_port=args.port or _free_port())
    ports = info["ports"]
    assert isinstance(ports, dict)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    py = sys.executable
    async with trio.open_nursery() as nursery:
        procs: list[trio.Process] = []
        for name, argv in (("proxy", [py, "-m", "edge_proxy", "run", "--config", str(info["edge"])]),
                           ("agent", [py, "-m", "inference_node", "run", "--config", str(info["agent"])])):
            proc = await trio.lowlevel.open_process(argv, stderr=-1, stdout=None, env=env)
            procs.append(proc)
            nursery.start_soon(_pump, name, proc, folder / f"{name}.log", args.verbose)
        try:
            print(_banner(info, folder), flush=True)
            api = f"http://127.0.0.1:{ports['api']}"
            token = Path(str(info["token"])).read_text().strip()
            if args.self_test:
                return await _self_test(api, token, f"http://127.0.0.1:{ports['listen']}")
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                for proc in procs:
                    if proc.returncode is None:
                        proc.send_signal(signal.SIGTERM)
                with trio.move_on_after(20):
                    for proc in procs:
                        await proc.wait()
                for proc in procs:
                    if proc.returncode is None:
                        proc.kill()
                        await proc.wait()
            nursery.cancel_scope.cancel()
    return 0


async def _self_test(api: str, token: str, url: str) -> int:
    """One full cycle without a person: serve, sleep, wake on a request, serve again."""
    await _wait_for(api + "/v1/status", token, _all_ready, STARTUP_TIMEOUT_S)
    took, text = await _chat(url)
    print(f"demo self-test: first answer in {took * 1000:.0f} ms: {text!r}", flush=True)
    await _wait_for(api + "/v1/power", token, lambda d: d["state"] == "SLEEPING",
                    SELF_TEST_WAKE_TIMEOUT_S)
    print("demo self-test: the node is asleep; sending a request through the proxy", flush=True)
    took, text = await _chat(url)
    print(f"demo self-test: woke the node and answered in {took * 1000:.0f} ms: {text!r}", flush=True)
    if text != DEMO_SENTENCE:
        print(f"demo self-test: failed: expected the model's sentence {DEMO_SENTENCE!r}",
              flush=True)
        return 1
    print("demo self-test: ok", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m inference_node.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=8080, help="where the proxy listens (0: any free port)")
    p.add_argument("--idle-timeout-s", type=float, default=20.0, help="idle time before the node sleeps")
    p.add_argument("--dir", help="folder for the model, configs and logs (default: a new temp folder)")
    p.add_argument("--verbose", action="store_true", help="show every log line, not just state changes")
    p.add_argument("--self-test", action="store_true",
                   help="run one sleep/wake cycle by itself and exit 0 if it worked")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return trio.run(run_demo, args)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
