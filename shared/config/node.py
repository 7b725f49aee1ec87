"""The node-agent's config schema: the agent itself, its proxy, power, P-states, instances.

Instances are tables keyed by name, in the main file or in ``*.toml`` files of
``agent.instances_dir`` (like gppm's config directory):

```toml
[instances.qwen]
model = "/models/qwen2.5-7b-q4_k_m.gguf"
port = 8080
args = ["-c", "8192", "-ngl", "99"]
gpus = [0]
```
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import shlex
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from shared.config.loader import Context, Secret, build, read_secret, read_toml, setting
from shared.config.values import HostPort, check_host, parse_hostport
from shared.errors import ConfigError

# Where `node-agent run` and the commands that find the agent look without --config.
DEFAULT_CONFIG = Path("/etc/llamanap/node-agent.toml")

Argv = list[str] | str

# An on-demand instance's memory goes back this long after its last task ended.
DEFAULT_TTL_S = 600.0


def split_command(command: Argv, ctx: Context, key: str) -> list[str]:
    """An argv list as is, or a string split like a shell would (but never run by one)."""
    if isinstance(command, list):
        argv = command
    else:
        try:
            argv = shlex.split(command)
        except ValueError as exc:
            raise ctx.error(key, f"cannot split {command!r}: {exc}") from exc
    if not argv or not argv[0]:
        raise ctx.error(key, "empty command; expected a program and its arguments")
    return argv


def _argv(command: Argv) -> list[str]:
    """The argv of a command ``split_command`` accepted at load time."""
    return command if isinstance(command, list) else shlex.split(command)


@dataclass(frozen=True)
class HealthConfig:
    """How the supervisor decides an instance is READY, and later that it is still alive.

    ``timeout_s`` and ``interval_s`` govern start-up. Once READY, ``path`` is probed every
    ``liveness_interval_s``; a probe that has no 200 within ``liveness_timeout_s`` fails, and
    ``failures_before_restart`` failures in a row mean the server is wedged (llama-server
    answers ``/health`` while it generates): it is killed and respawned with backoff. Probes
    never overlap, so a wedged server is noticed within ``liveness_interval_s +
    (failures_before_restart - 1) * max(liveness_interval_s, liveness_timeout_s) +
    liveness_timeout_s`` (35 s with the defaults).
    """

    path: str = "/health"
    timeout_s: float = setting(300.0, min=0.1, max=86400, help="start-up budget until healthy")
    interval_s: float = setting(0.25, min=0.01, max=60)
    liveness_interval_s: float = setting(10.0, max=86400, help="while READY: seconds between probes")
    liveness_timeout_s: float = setting(5.0, max=3600, help="while READY: a probe's own budget")
    failures_before_restart: int = setting(3, min=1, max=1000,
                                           help="failed probes in a row that mean wedged")

    def check(self, ctx: Context, key: str) -> None:
        if not self.path.startswith("/"):
            raise ctx.error(f"{key}.path", f"found {self.path!r}; expected a path starting with /")
        for name in ("liveness_interval_s", "liveness_timeout_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):  # the bounds let nan through
                raise ctx.error(f"{key}.{name}", f"found {value!r}; expected seconds > 0, such as 10")


@dataclass(frozen=True)
class RestartConfig:
    """When a dead instance is started again, and when the supervisor gives up."""

    policy: Literal["always", "on-failure", "never"] = "on-failure"
    backoff_initial_s: float = setting(0.5, min=0, max=3600, help="first respawn delay; doubles")
    backoff_max_s: float = setting(60.0, min=0, max=86400)
    max_restarts: int = setting(5, min=0, max=1000, help="crashes within window_s before FAILED")
    window_s: float = setting(300.0, min=1, max=86400)

    def check(self, ctx: Context, key: str) -> None:
        if self.backoff_initial_s > self.backoff_max_s:
            raise ctx.error(f"{key}.backoff_initial_s", f"found {self.backoff_initial_s:g}; "
                            f"expected at most backoff_max_s ({self.backoff_max_s:g})")


@dataclass(frozen=True)
class InstanceConfig:
    """One llama-server (or any server) the agent supervises.

    Either ``command`` (the whole argv) or the structured ``model`` + ``args`` form, which runs
    ``binary`` (llama-server by default) with ``--model MODEL --host HOST --port PORT
    --alias NAME ARGS`` (no ``--alias`` when ARGS give one).
    """

    enabled: bool = True
    command: Argv | None = None
    binary: Path | None = None
    model: Path | None = None
    host: str = "127.0.0.1"
    port: int | None = setting(None, min=1, max=65535)
    args: list[str] = setting(default_factory=list)
    env: dict[str, str] = setting(default_factory=dict)
    gpus: list[int | str] | Literal["auto"] | None = None
    health: HealthConfig = setting(default_factory=HealthConfig)
    restart: RestartConfig = setting(default_factory=RestartConfig)
    stop_timeout_s: float = setting(15.0, min=0, max=3600)
    post_launch_hooks: list[Argv] = setting(default_factory=list)
    allow_partial_offload: bool = False
    load: Literal["always", "on-demand"] = setting(
        "always", help='"on-demand": started on the first request, unloaded after ttl_s')
    ttl_s: float = setting(DEFAULT_TTL_S, min=0, max=365 * 86400,
                           help="on-demand: unload this long after the last task; 0 keeps it")
    models: list[str] | None = setting(None, help="names clients send as model; default the "
                                       "instance name")

    def model_names(self, name: str) -> list[str]:
        """The names clients may send in ``model`` for this instance."""
        return list(self.models) if self.models is not None else [name]

    def check(self, ctx: Context, key: str) -> None:
        if self.models is not None:
            if not self.models:
                raise ctx.error(f"{key}.models", "empty; list at least one name, or leave it "
                                "out to use the instance name")
            for i, model in enumerate(self.models):
                if not model.strip() or model != model.strip():
                    raise ctx.error(f"{key}.models[{i}]", f"found {model!r}; expected a "
                                    "non-empty name without surrounding spaces")
                if model in self.models[:i]:
                    raise ctx.error(f"{key}.models[{i}]", f"{model!r} is listed twice")
        if self.command is not None and (self.model is not None or self.args):
            raise ctx.error(f"{key}.command", "set either command or model/args, not both")
        if self.command is None and self.model is None:
            raise ctx.error(key, "needs either command = [...] or model = \"PATH.gguf\"")
        if self.command is not None:
            split_command(self.command, ctx, f"{key}.command")
            if self.port is None and self.command_port is None:
                raise ctx.error(f"{key}.port", "missing; set port (or --port in command)")
        elif self.port is None:
            raise ctx.error(f"{key}.port", "missing; the structured form needs port = N")
        check_host(self.host, ctx, f"{key}.host")
        if self.command is not None:
            command_host = _flag(self.argv_list or [], "--host")
            if command_host is not None:
                check_host(command_host, ctx, f"{key}.command")
            port = self.command_port
            if self.port is None and port is not None and not 1 <= port <= 65535:
                raise ctx.error(f"{key}.command", f"found --port {port}; allowed: 1 to 65535")
        if self.gpus == "auto" and self.command is not None and not any(
                a in ("-m", "--model") or a.startswith("--model=") for a in self.argv_list or []):
            raise ctx.error(f"{key}.gpus", '"auto" places the model by its size; give the '
                            "command a --model PATH.gguf (or use model = ...)")
        for i, gpu in enumerate(self.gpus if isinstance(self.gpus, list) else []):
            bad_index = isinstance(gpu, int) and gpu < 0
            if bad_index or (isinstance(gpu, str) and not gpu.startswith(("GPU-", "MIG-"))):
                raise ctx.error(f"{key}.gpus[{i}]", f"found {gpu!r}; expected a GPU index (0, 1, ...) "
                                'or a UUID such as "GPU-5f1c..." (nvidia-smi -L)')
        for name in self.env:
            if not name or "=" in name:
                # the child's spawn would raise at start: "illegal environment variable name"
                raise ctx.error(f"{key}.env", f"found variable name {name!r}; a name is not "
                                "empty and has no =")
        if isinstance(self.gpus, list) and "CUDA_VISIBLE_DEVICES" in self.env:
            raise ctx.error(f"{key}.env.CUDA_VISIBLE_DEVICES", "set either gpus or "
                            "env.CUDA_VISIBLE_DEVICES, not both (gpus sets it)")
        for i, hook in enumerate(self.post_launch_hooks):
            split_command(hook, ctx, f"{key}.post_launch_hooks[{i}]")

    @property
    def argv_list(self) -> list[str] | None:
        if self.command is None:
            return None
        return self.command if isinstance(self.command, list) else shlex.split(self.command)

    @property
    def command_port(self) -> int | None:
        argv = self.argv_list or []
        for flag, value in itertools.pairwise(argv):
            if flag == "--port" and value.isascii() and value.isdigit():
                return int(value)
        return None

    @property
    def effective_port(self) -> int:
        port = self.port if self.port is not None else self.command_port
        assert port is not None, "checked at load time"
        return port

    @property
    def effective_host(self) -> str:
        """Where the instance listens: ``--host`` of the command, else ``host``."""
        return _flag(self.argv_list or [], "--host") or self.host


def _flag(argv: list[str], flag: str) -> str | None:
    return next((value for arg, value in itertools.pairwise(argv) if arg == flag), None)


@dataclass(frozen=True)
class AgentSection:
    """The agent's own settings."""

    node: str = setting("gpubox", help="the name the edge proxy knows this node by")
    api_listen: str = "127.0.0.1:9181"
    token: Secret | None = None
    token_file: Path | None = None
    instances_dir: Path | None = None
    state_file: Path = setting(Path("/var/lib/llamanap/state.toml"),
                               help="enable/disable overrides made through the API")
    log_ring_lines: int = setting(500, min=10, max=100_000)
    memory_budget_mib: int | None = setting(
        None, min=1, max=1 << 30, help="cap per device (host memory on a CPU-only host) on "
        "what the instances may take by their estimates")
    evict_wait_s: float = setting(60.0, min=0, max=86400, help="how long a load waits for a "
                                  "busy on-demand instance to finish before it is refused")

    def check(self, ctx: Context, key: str) -> None:
        addr = parse_hostport(self.api_listen, ctx, f"{key}.api_listen", allow_port_zero=True)
        object.__setattr__(self, "token", read_secret(self.token, self.token_file, ctx, key))
        if self.token is None and not addr.is_loopback:
            raise ctx.error(f"{key}.token", f"missing while api_listen is {self.api_listen}; "
                            "set token_file, or listen on 127.0.0.1")

    @property
    def api_addr(self) -> HostPort:
        host, _, port = self.api_listen.rpartition(":")
        return HostPort(host.strip("[]"), int(port))


@dataclass(frozen=True)
class ProxySection:
    """The edge proxy this node reports to (optional: without it the proxy probes)."""

    url: str
    token: Secret | None = None
    token_file: Path | None = None
    allow_suspend_if_unreachable: bool = True
    timeout_s: float = setting(3.0, min=0.1, max=60)

    def check(self, ctx: Context, key: str) -> None:
        expected = f"found {self.url!r}; expected http://HOST:PORT"
        if not self.url.startswith(("http://", "https://")):
            raise ctx.error(f"{key}.url", expected)
        try:
            parts = urllib.parse.urlsplit(self.url)
            if parts.port == 0:  # .port raises for a port out of range or not a number
                raise ValueError("port 0")
        except ValueError:
            raise ctx.error(f"{key}.url", f"{expected} (PORT 1 to 65535)") from None
        if not parts.hostname:
            raise ctx.error(f"{key}.url", expected)
        check_host(parts.hostname, ctx, f"{key}.url", shown=self.url)
        object.__setattr__(self, "token", read_secret(self.token, self.token_file, ctx, key))


@dataclass(frozen=True)
class PowerSection:
    """When and how the box goes to sleep."""

    enabled: bool = True
    idle_timeout_s: float = setting(900.0, min=1, max=7 * 86400)
    min_awake_s: float = setting(120.0, min=0, max=86400, help="after boot or resume")
    check_interval_s: float = setting(5.0, min=0.05, max=600)
    suspend_command: Argv = setting(default_factory=lambda: ["systemctl", "suspend"])
    suspend_command_timeout_s: float = setting(60.0, min=1, max=7 * 86400,
                                               help="the suspend command must return by then")
    resume_timeout_s: float = setting(120.0, min=1, max=7 * 86400,
                                      help="awake time after the suspend command to see a resume")
    failed_suspend_backoff_s: float = setting(300.0, min=0, max=86400)
    watch_connections: bool = True
    watch_foreign_gpu_processes: bool = True
    watch_logged_in_users: bool = False
    watch_inhibitor_locks: bool = False
    busy_command: Argv | None = setting(None, help="exit 0 means busy; its stdout is the reason")
    ignore_connections_from: list[str] | None = setting(
        None, help="hosts whose connections are not use (default: the [proxy] url's host)")

    def check(self, ctx: Context, key: str) -> None:
        split_command(self.suspend_command, ctx, f"{key}.suspend_command")
        for i, host in enumerate(self.ignore_connections_from or []):
            check_host(host, ctx, f"{key}.ignore_connections_from[{i}]")
        if self.busy_command is not None:
            split_command(self.busy_command, ctx, f"{key}.busy_command")

    @property
    def suspend_argv(self) -> list[str]:
        return _argv(self.suspend_command)

    @property
    def busy_argv(self) -> list[str] | None:
        return None if self.busy_command is None else _argv(self.busy_command)


PSTATE_DRIVER_DECIDES = 16  # nvidia-pstate's "let the driver decide"


@dataclass(frozen=True)
class PstateSection:
    """Per-GPU P-state switching from llama-server activity."""

    enabled: bool = True
    low: int = setting(8, min=0, max=16)
    high: int = setting(16, min=0, max=16, help="16 lets the driver decide")
    low_delay_s: float = setting(2.0, min=0, max=3600, help="idle time before switching low")

    def check(self, ctx: Context, key: str) -> None:
        # P0 is the fastest and hungriest state; 16 lets the driver pick one as load needs
        if self.low == PSTATE_DRIVER_DECIDES:
            raise ctx.error(f"{key}.low", f"found {self.low}; the low state must be a P-state "
                            "0-15 such as 8 (to never switch, set enabled = false)")
        if self.high != PSTATE_DRIVER_DECIDES and self.low <= self.high:
            raise ctx.error(f"{key}.low", f"found {self.low}; expected a slower P-state than high "
                            f"({self.high}): a larger number, or high = 16")


@dataclass(frozen=True)
class PlacementSection:
    """VRAM placement of instances with gpus = "auto"."""

    safety_margin_mib: int = setting(512, min=0, max=1 << 20)


@dataclass(frozen=True)
class ReportSection:
    """What the node reports to the edge proxy (needs ``[proxy]``): GPU samples, instance
    changes and sleep cycles, batched, kept while the proxy is unreachable."""

    enabled: bool = True
    sample_interval_s: float = setting(10.0, min=0.05, max=3600, help="between GPU samples")
    send_interval_s: float = setting(5.0, min=0.05, max=3600, help="between batches")
    batch_records: int = setting(200, min=1, max=1000, help="records per batch at most")
    buffer_records: int = setting(20_000, min=10, max=1_000_000,
                                  help="kept while the proxy is unreachable; the oldest go first")


@dataclass(frozen=True)
class NodeAgentConfig:
    """The whole node-agent config file (instances merged from instances_dir)."""

    agent: AgentSection = setting(default_factory=AgentSection)
    proxy: ProxySection | None = None
    power: PowerSection = setting(default_factory=PowerSection)
    pstate: PstateSection = setting(default_factory=PstateSection)
    placement: PlacementSection = setting(default_factory=PlacementSection)
    report: ReportSection = setting(default_factory=ReportSection)
    instances: dict[str, InstanceConfig] = setting(default_factory=dict)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    def check(self, ctx: Context, key: str) -> None:
        for name in self.instances:
            if not name.replace("-", "").replace("_", "").isalnum():
                raise ctx.error(f"instances.{name}", "bad name; use letters, digits, - and _")
        _check_ports(self.agent, self.instances, dict.fromkeys(self.instances, ctx.source))
        _check_models(self.instances, dict.fromkeys(self.instances, ctx.source))


def _check_ports(agent: AgentSection, instances: dict[str, InstanceConfig],
                 origin: dict[str, Path]) -> None:
    ports: dict[int, str] = {}
    api = agent.api_addr
    for name, inst in instances.items():
        # also a disabled one: `node-agent enable` would start it on the API's port
        if api.overlaps(HostPort(inst.effective_host, inst.effective_port)):
            raise ConfigError(origin[name], f"instances.{name}.port", f"{inst.effective_port} "
                              f"is the port of agent.api_listen ({agent.api_listen}); pick another")
        if not inst.enabled:
            continue
        port = inst.effective_port
        if port in ports:
            raise ConfigError(origin[name], f"instances.{name}.port",
                              f"{port} is also the port of instance {ports[port]!r}; pick another")
        ports[port] = name


def _check_models(instances: dict[str, InstanceConfig], origin: dict[str, Path]) -> None:
    """Each model name clients may send belongs to one instance."""
    owner: dict[str, str] = {}
    for name, inst in instances.items():
        for i, model in enumerate(inst.model_names(name)):
            if model in owner:
                key = f"instances.{name}.models[{i}]" if inst.models is not None \
                    else f"instances.{name}"
                raise ConfigError(origin[name], key,
                                  f"model name {model!r} is also served by instance "
                                  f"{owner[model]!r}; names in models must be unique")
            owner[model] = name


def load_node_config(path: Path) -> NodeAgentConfig:
    """Read the agent's file, merge ``*.toml`` instance files from instances_dir, check all.

    Errors in an instance file name that file, so the message points where the fix goes.
    """
    path = Path(path).absolute()
    ctx = Context(path)
    cfg = build(NodeAgentConfig, read_toml(path), ctx, "")
    folder = cfg.agent.instances_dir
    if folder is None:
        return cfg
    if not folder.is_dir():
        raise ctx.error("agent.instances_dir", f"{folder} is not a directory; create it or fix the path")
    instances = dict(cfg.instances)
    origin = dict.fromkeys(instances, path)
    for file in sorted(folder.glob("*.toml")):
        sub = read_toml(file)
        extra = sorted(set(sub) - {"instances"})
        if extra:
            raise ConfigError(file, extra[0], "unknown key; instance files hold only [instances.NAME]")
        raw = sub.get("instances", {})
        if not isinstance(raw, dict):
            raise ConfigError(file, "instances", "expected tables [instances.NAME]")
        for name, table in raw.items():
            if name in instances:
                raise ConfigError(file, f"instances.{name}", f"already defined in {origin[name]}")
            instances[name] = build(InstanceConfig, table, Context(file), f"instances.{name}")
            origin[name] = file
    _check_ports(cfg.agent, instances, origin)
    _check_models(instances, origin)
    return dataclasses.replace(cfg, instances=instances)
