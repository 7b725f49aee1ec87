"""Turn an instance's config into the argv and environment it runs with, and check them.

``build_launch`` is the one place that decides what a child runs: the full ``command`` as
given, or the structured form ``BINARY --model M --host H --port P --alias NAME ARGS`` (no
``--alias`` when ARGS set one). Every child gets
``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (so indices mean the same GPUs as NVML's bus order) and,
when ``gpus`` is set, ``CUDA_VISIBLE_DEVICES``. ``LaunchOverrides`` lets a planner (VRAM
placement) add arguments, environment or a GPU list without touching the config.

``preflight`` finds the mistakes that would make a start fail in a confusing way (missing
model, program that is not executable, port already taken) and reports each in one line
naming the instance.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import shutil
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from inference_node.errors import LaunchError
from shared.config.node import InstanceConfig, NodeAgentConfig
from shared.errors import LlamanapError
from shared.llama_bin import find_llama_server

ALIAS_FLAGS = ("-a", "--alias")


@dataclass(frozen=True)
class LaunchOverrides:
    """Changes a planner makes to one start: appended args, extra env, a GPU list."""

    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    gpus: tuple[int | str, ...] | None = None


@dataclass(frozen=True)
class LaunchSpec:
    """Everything needed to spawn one instance and to probe its health."""

    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str]  # the full environment of the child
    host: str  # where it listens (as configured)
    port: int
    model: Path | None
    gpus: tuple[int | str, ...] | None = None  # what CUDA_VISIBLE_DEVICES lists; None: inherited

    @property
    def probe_host(self) -> str:
        """The address to probe: a wildcard listen address is reached on loopback."""
        if self.host in ("0.0.0.0", ""):
            return "127.0.0.1"
        if self.host == "::":
            return "::1"
        return self.host


def build_launch(
    name: str,
    config: InstanceConfig,
    overrides: LaunchOverrides | None = None,
    *,
    base_env: Mapping[str, str] | None = None,
) -> LaunchSpec:
    """The argv and environment of instance ``name``; raises ``LaunchError`` if none can be built."""
    extra = overrides or LaunchOverrides()
    host = config.host
    model = config.model
    if config.command is not None:
        argv = list(config.argv_list or [])
        host = _flag_value(argv, "--host") or host
        model = _model_from_argv(argv)
    else:
        binary = config.binary
        if binary is None:
            try:
                binary = find_llama_server()
            except LlamanapError as exc:
                raise LaunchError(f"instances.{name}: {exc}") from exc
        argv = [str(binary), "--model", str(config.model), "--host", host,
                "--port", str(config.effective_port), *_alias(config.model_names(name), config.args), *config.args]
    argv += extra.args
    env = dict(os.environ if base_env is None else base_env)
    env.update(config.env)
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    gpus = extra.gpus if extra.gpus is not None else config.gpus
    if gpus == "auto":
        raise LaunchError(f'instances.{name}.gpus: "auto" needs VRAM placement, which did not '
                          "assign GPUs; list GPU indices or UUIDs")
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
    env.update(extra.env)
    return LaunchSpec(name, tuple(argv), env, host, config.effective_port, model,
                      None if gpus is None else tuple(gpus))


def preflight(spec: LaunchSpec, *, check_port: bool) -> list[str]:
    """One line per problem that would stop ``spec`` from starting; empty when it looks fine."""
    problems: list[str] = []
    program = spec.argv[0]
    where = f"instances.{spec.name}"
    resolved = shutil.which(program, path=spec.env.get("PATH")) if "/" not in program else program
    if resolved is None:
        problems.append(f"{where}: command {program!r} not found on PATH; give its full path")
    elif not (os.path.isfile(resolved) and os.access(resolved, os.X_OK)):
        problems.append(f"{where}: {resolved} is not an executable file; fix the path or chmod +x")
    if spec.model is not None and not spec.model.is_file():
        problems.append(f"{where}: model file {spec.model} not found; fix the path or download it")
    if check_port:
        taken = port_problem(spec.host, spec.port)
        if taken:
            problems.append(f"{where}: {taken}")
    return problems


def instance_problems(config: NodeAgentConfig) -> list[str]:
    """Preflight lines (no port check) for every enabled instance: what check-config reports."""
    problems: list[str] = []
    for name, inst in config.instances.items():
        if not inst.enabled:
            continue
        # GPUs of an "auto" instance are chosen at start; here only its files are checked.
        placed = LaunchOverrides(gpus=()) if inst.gpus == "auto" else None
        try:
            problems += preflight(build_launch(name, inst, placed), check_port=False)
        except LaunchError as exc:
            problems.append(str(exc))
    return problems


def port_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on right now, or None if a bind would work.

    Binds with SO_REUSEADDR like llama-server (cpp-httplib) does, so a port in TIME_WAIT
    after a restart is not reported, while a port with a live listener is.
    """
    family = socket.AF_INET
    try:
        if ipaddress.ip_address(host).version == 6:
            family = socket.AF_INET6
    except ValueError:
        pass  # a host name: let the OS resolve it with AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"port {port} on {host} is already in use by another program; " \
                       "stop it or pick another port"
            return f"cannot listen on {host}:{port} ({exc.strerror}); fix host or port"
    return None


def _alias(names: Sequence[str], args: Sequence[str]) -> list[str]:
    """``--alias NAME[,NAME...]`` (the instance's ``models``, default its name) unless
    ``args`` name the model already.

    Without an alias llama-server names its model by the file's path, and that is what
    frontends list (``/v1/models``) and send back as ``model``; the instance's name (or the
    names in ``models``) is what the proxy's routes, the on-demand scheduler and a person use.
    """
    if any(a in ALIAS_FLAGS or a.startswith("--alias=") for a in args):
        return []
    return ["--alias", ",".join(names)]


def _flag_value(argv: Sequence[str], *flags: str) -> str | None:
    for i, arg in enumerate(argv[:-1]):
        if arg in flags:
            return argv[i + 1]
    return None


def _model_from_argv(argv: Sequence[str]) -> Path | None:
    value = _flag_value(argv, "-m", "--model")
    return Path(value) if value else None
