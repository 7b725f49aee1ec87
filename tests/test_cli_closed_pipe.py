"""Both command lines with their output piped into a reader that stops early
(``edge-proxy status | head -1``): no traceback, a quiet exit (141, as a shell reports a program
SIGPIPE stopped). Real processes, real services, real files.

Each command runs twice: with a reader that already closed the pipe (every write fails: the
case that printed "BrokenPipeError" before), and under ``bash -c "... | head -1"`` (where
output that fits in one write may arrive before head exits, so that run may see no error).
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w

from shared.cli import EXIT_PIPE
from shared.tiny_gguf import TinyModelSpec, write_tiny_model
from tests.support.edge import write_config as write_edge_config
from tests.support.ports import free_port
from tests.support.supervised import STATE_TIMEOUT_S, toy_command

REPO = Path(__file__).resolve().parent.parent
SERVICES = {"edge-proxy": "edge_proxy", "node-agent": "inference_node"}
POLL_S = 0.05


def argv(service: str, *args: str) -> list[str]:
    return [sys.executable, "-m", SERVICES[service], *args]


def into_closed_pipe(command: list[str]) -> subprocess.CompletedProcess[str]:
    """Run ``command`` with stdout on a pipe nobody reads any more."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(command, stdout=write_end, stderr=subprocess.PIPE, text=True,
                              timeout=STATE_TIMEOUT_S, cwd=REPO)
    finally:
        os.close(write_end)


def into_head(command: list[str]) -> subprocess.CompletedProcess[str]:
    """``COMMAND | head -1`` in a shell; the command's own exit status comes back."""
    script = f"{shlex.join(command)} | head -1; exit ${{PIPESTATUS[0]}}"
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                          timeout=STATE_TIMEOUT_S, cwd=REPO)


def wait_answering(command: list[str], proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + STATE_TIMEOUT_S
    while subprocess.run(command, capture_output=True, cwd=REPO,
                         timeout=STATE_TIMEOUT_S).returncode != 0:
        assert proc.poll() is None, "the service exited"
        assert time.monotonic() < deadline, "the service never answered"
        time.sleep(POLL_S)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=STATE_TIMEOUT_S)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pipe")
    model = write_tiny_model(folder / "m.gguf", TinyModelSpec())
    token = folder / "token"
    token.write_text("pipe-token\n")
    agent = folder / "node-agent.toml"
    agent.write_text(tomli_w.dumps({
        "agent": {"api_listen": f"127.0.0.1:{free_port()}", "token_file": str(token),
                  "state_file": str(folder / "state.toml")},
        "power": {"enabled": False},
        "instances": {"a": {"command": toy_command(free_port()), "health": {"interval_s": 0.05}}},
    }))
    edge = write_edge_config(folder, free_port(), free_port())
    edge.write_text(edge.read_text().replace('listen = "127.0.0.1:0"\ntoken',
                                             f'listen = "127.0.0.1:{free_port()}"\ntoken', 1))
    return {"model": model, "agent": agent, "edge": edge}


@pytest.fixture(scope="module")
def services(files: dict[str, Path]) -> Iterator[None]:
    """A running node-agent and edge-proxy, for the commands that ask them."""
    agent = subprocess.Popen(argv("node-agent", "run", "--config", str(files["agent"])),
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proxy = subprocess.Popen(argv("edge-proxy", "run", "-c", str(files["edge"])),
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_answering(argv("node-agent", "status", "--config", str(files["agent"])), agent)
        wait_answering(argv("edge-proxy", "status", "-c", str(files["edge"])), proxy)
        yield
    finally:
        stop(agent)
        stop(proxy)


OFFLINE = [  # commands that print without a service
    ("edge-proxy", "check-config {edge}"),
    ("node-agent", "check-config {agent}"),
    ("node-agent", "analyze {model} --layers"),
    ("node-agent", "plan {model} --assume-gpus 200,400 --margin-mib 0 --process-mib 0"),
    ("node-agent", "plan {model} --assume-gpus 200,400 --margin-mib 0 --process-mib 0 --json"),
]
ONLINE = [  # commands that ask the running services
    ("edge-proxy", "status -c {edge}"),
    ("edge-proxy", "status --json -c {edge}"),
    ("node-agent", "status --config {agent}"),
    ("node-agent", "status --json --config {agent}"),
    ("node-agent", "power --config {agent}"),
    ("node-agent", "inhibit --list --config {agent}"),
    ("node-agent", "logs a -n 50 --config {agent}"),
]


def command(service: str, args: str, files: dict[str, Path]) -> list[str]:
    return argv(service, *shlex.split(args.format(**{k: str(v) for k, v in files.items()})))


def check_quiet(cmd: list[str]) -> None:
    whole = subprocess.run(cmd, capture_output=True, text=True, timeout=STATE_TIMEOUT_S, cwd=REPO)
    assert whole.returncode == 0 and whole.stdout, whole.stderr  # it does print
    closed = into_closed_pipe(cmd)
    assert closed.stderr == "" and closed.returncode == EXIT_PIPE, closed.stderr
    head = into_head(cmd)
    assert head.stderr == "" and head.returncode in (0, EXIT_PIPE), head.stderr
    first = whole.stdout.splitlines(keepends=True)[0]
    assert head.stdout.split()[:2] == first.split()[:2]  # later words may hold times


@pytest.mark.parametrize("service", SERVICES)
def test_help_into_a_closed_pipe_is_quiet(service: str) -> None:
    # argparse drops a failed write of the help text itself, so --help still exits 0
    for result in (into_closed_pipe(argv(service, "--help")), into_head(argv(service, "--help"))):
        assert result.stderr == "" and result.returncode == 0, result.stderr


@pytest.mark.parametrize(("service", "args"), OFFLINE)
def test_offline_commands_into_a_closed_pipe_are_quiet(
        service: str, args: str, files: dict[str, Path]) -> None:
    check_quiet(command(service, args, files))


@pytest.mark.parametrize(("service", "args"), ONLINE)
def test_commands_asking_a_service_into_a_closed_pipe_are_quiet(
        service: str, args: str, files: dict[str, Path], services: None) -> None:
    check_quiet(command(service, args, files))
