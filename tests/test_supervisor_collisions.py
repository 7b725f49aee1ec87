"""Ports, collisions and bad commands: one line naming the instance, the others unharmed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import tomli_w
import trio

from inference_node.supervisor import LaunchOverrides, State, Supervisor, build_launch
from shared.config.node import load_node_config
from shared.errors import ConfigError
from tests.support.ports import free_port
from tests.support.supervised import instance, toy_command, wait_state

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
async def sup(nursery: trio.Nursery) -> AsyncIterator[Supervisor]:
    supervisor = Supervisor()
    await nursery.start(supervisor.run)
    yield supervisor


def check_config(path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "inference_node", "check-config", str(path), *extra],
                          capture_output=True, text=True, timeout=60, cwd=REPO)


def test_two_instances_on_one_port_is_a_config_error(tmp_path: Path) -> None:
    cfg = tmp_path / "node-agent.toml"
    cfg.write_text(tomli_w.dumps({"instances": {
        "a": {"command": ["srv", "--port", "8080"]},
        "b": {"model": "m.gguf", "port": 8080},
    }}))
    with pytest.raises(ConfigError) as err:
        load_node_config(cfg)
    assert str(err.value) == f"{cfg}: instances.b.port: 8080 is also the port of instance 'a'; pick another"
    out = check_config(cfg)
    assert out.returncode == 3 and out.stderr.count("\n") == 1


def test_check_config_warns_about_missing_model_and_program(tmp_path: Path) -> None:
    cfg = tmp_path / "node-agent.toml"
    cfg.write_text(tomli_w.dumps({"instances": {
        "nomodel": {"binary": sys.executable, "model": "missing.gguf", "port": 8081},
        "noprog": {"command": ["/nonexistent/llama-server", "--port", "8082"]},
        "notexec": {"command": [str(cfg), "--port", "8083"]},
    }}))
    out = check_config(cfg)
    assert out.returncode == 0, out.stderr
    assert out.stderr.splitlines() == [
        f"node-agent: warning: instances.nomodel: model file {tmp_path / 'missing.gguf'} not found; "
        "fix the path or download it",
        "node-agent: warning: instances.noprog: /nonexistent/llama-server is not an executable "
        "file; fix the path or chmod +x",
        f"node-agent: warning: instances.notexec: {cfg} is not an executable file; fix the path "
        "or chmod +x",
    ]
    assert check_config(cfg, "--strict").returncode == 1


async def test_port_taken_by_another_program(sup: Supervisor, tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        await sup.apply({
            "clash": instance("clash", {"command": toy_command(taken)}, tmp_path / "x.toml"),
            "fine": instance("fine", {"command": toy_command(free_port())}, tmp_path / "x.toml"),
        }, {})
        await wait_state(sup, "clash", State.FAILED)
        await wait_state(sup, "fine", State.READY)
    assert sup.get("clash").reason == (
        f"instances.clash: port {taken} on 127.0.0.1 is already in use by another program; "
        "stop it or pick another port")


async def test_port_of_a_running_instance(sup: Supervisor, tmp_path: Path) -> None:
    port = free_port()
    await sup.apply({
        "first": instance("first", {"command": toy_command(port)}, tmp_path / "x.toml"),
        "second": instance("second", {"command": toy_command(port), "enabled": False},
                           tmp_path / "x.toml"),
    }, {})
    await wait_state(sup, "first", State.READY)
    pid = sup.get("first").child.pid  # type: ignore[union-attr]
    sup.start("second", "test")
    await wait_state(sup, "second", State.FAILED)
    assert sup.get("second").reason == (
        f"instances.second: port {port} is in use by instance 'first' (ready); "
        "stop it or pick another port")
    assert sup.get("first").state is State.READY and sup.get("first").child.pid == pid  # type: ignore[union-attr]


async def test_command_not_executable_or_not_found(sup: Supervisor, tmp_path: Path) -> None:
    script = tmp_path / "server.sh"
    script.write_text("#!/bin/sh\nexit 0\n")  # not chmod +x
    await sup.apply({
        "noexec": instance("noexec", {"command": [str(script), "--port", str(free_port())]},
                           tmp_path / "x.toml"),
        "nopath": instance("nopath", {"command": f"no-such-llama-server --port {free_port()}"},
                           tmp_path / "x.toml"),
        "fine": instance("fine", {"command": toy_command(free_port())}, tmp_path / "x.toml"),
    }, {})
    await wait_state(sup, "noexec", State.FAILED)
    await wait_state(sup, "nopath", State.FAILED)
    await wait_state(sup, "fine", State.READY)
    assert sup.get("noexec").reason == (
        f"instances.noexec: {script} is not an executable file; fix the path or chmod +x")
    assert sup.get("nopath").reason == (
        "instances.nopath: command 'no-such-llama-server' not found on PATH; give its full path")


def test_launch_env_gpus_and_overrides(tmp_path: Path) -> None:
    src = tmp_path / "x.toml"
    model = tmp_path / "m.gguf"
    structured = instance("s", {"binary": "/opt/llama/llama-server", "model": str(model), "port": 9001,
                                "host": "0.0.0.0", "args": ["-c", "4096"], "gpus": [0, 2],
                                "env": {"FOO": "1"}}, src)
    spec = build_launch("s", structured, base_env={"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "7"})
    assert spec.argv == ("/opt/llama/llama-server", "--model", str(model), "--host", "0.0.0.0",
                         "--port", "9001", "--alias", "s", "-c", "4096")
    assert spec.env == {"PATH": "/bin", "FOO": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
                        "CUDA_VISIBLE_DEVICES": "0,2"}
    assert spec.probe_host == "127.0.0.1"

    uuid = "GPU-5f1c2d3e-0000-1111-2222-333344445555"
    spec = build_launch("s", structured, LaunchOverrides(args=("-ngl", "99", "-ts", "1,3"),
                                                         env={"X": "y"}, gpus=(uuid,)),
                        base_env={})
    assert spec.argv[-4:] == ("-ngl", "99", "-ts", "1,3")
    assert spec.env["CUDA_VISIBLE_DEVICES"] == uuid and spec.env["X"] == "y"

    for own in (["-a", "qwen"], ["--alias", "qwen"], ["--alias=qwen"]):  # the config's own wins
        named = instance("n", {"binary": "/opt/llama/llama-server", "model": str(model),
                               "port": 9003, "args": own}, src)
        argv = build_launch("n", named, base_env={}).argv
        assert argv[-len(own):] == tuple(own) and argv.count("n") == 0, argv

    plain = instance("p", {"command": "llama-server -m /m.gguf --port 9002"}, src)
    spec = build_launch("p", plain, base_env={})
    assert spec.argv == ("llama-server", "-m", "/m.gguf", "--port", "9002")
    assert spec.env == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"} and spec.port == 9002
    assert str(spec.model) == "/m.gguf"


@pytest.mark.parametrize(("table", "key", "text"), [
    ({"gpus": [-1]}, "instances.g.gpus[0]", "found -1; expected a GPU index"),
    ({"gpus": ["cuda0"]}, "instances.g.gpus[0]", "found 'cuda0'; expected a GPU index"),
    ({"gpus": [0], "env": {"CUDA_VISIBLE_DEVICES": "1"}}, "instances.g.env.CUDA_VISIBLE_DEVICES",
     "set either gpus or env.CUDA_VISIBLE_DEVICES"),
])
def test_gpu_mistakes_name_the_key(tmp_path: Path, table: dict[str, object], key: str, text: str) -> None:
    with pytest.raises(ConfigError) as err:
        instance("g", {"command": ["srv", "--port", "1"], **table}, tmp_path / "x.toml")
    assert err.value.key == key and text in err.value.problem


def test_env_is_inherited_by_default(tmp_path: Path) -> None:
    spec = build_launch("e", instance("e", {"command": ["srv", "--port", "1"]}, tmp_path / "x.toml"))
    assert spec.env["PATH"] == os.environ["PATH"]


def test_check_config_checks_the_files_of_auto_instances(tmp_path: Path) -> None:
    cfg = tmp_path / "node-agent.toml"
    cfg.write_text(tomli_w.dumps({"instances": {
        "auto": {"binary": sys.executable, "model": "missing.gguf", "port": 8081, "gpus": "auto"},
    }}))
    out = check_config(cfg)
    assert out.returncode == 0
    assert out.stderr.splitlines() == [
        f"node-agent: warning: instances.auto: model file {tmp_path / 'missing.gguf'} not found; "
        "fix the path or download it"]
