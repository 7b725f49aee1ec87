"""The edge-proxy's config schema: nodes to wake, routes to relay, the control endpoint.

```toml
[control]
listen = "127.0.0.1:9180"
token_file = "/etc/llamanap/proxy.token"

[nodes.gpubox]
host = "192.168.1.50"
mac = "aa:bb:cc:dd:ee:ff"
wol = { broadcast = "192.168.1.255" }
agent_url = "http://192.168.1.50:9181"       # optional: its node-agent's API (models on demand)
agent_token_file = "/etc/llamanap/agent.token"

[[routes]]
listen = "0.0.0.0:8080"
node = "gpubox"
backend_port = 8080
ready = "http:/health"
```

HTTP-aware routes (``protocol = "http"``) know which requests may wake a node: polls such as
``GET /v1/models`` are answered from the last good answer while it sleeps. Several of them on
one ``listen`` form one listener that routes by the request's ``model`` across their nodes, or
across instances of one node on different ``backend_port``s::

    [[routes]]
    listen = "0.0.0.0:8000"
    node = "gpubox"
    backend_port = 8080
    ready = "http:/health"
    protocol = "http"
    models = ["qwen2.5-7b"]        # more are learned from the node's /v1/models
    [routes.http]                  # set once per listener; all optional
    no_wake = ["GET /v1/models", "GET /health"]   # replaces DEFAULT_NO_WAKE
    waking_comment_interval_s = 5.0
    request_body_timeout_s = 30.0  # a body still incomplete after this is answered 408

    [[routes]]
    listen = "0.0.0.0:8000"
    node = "otherbox"
    backend_port = 8080
    ready = "http:/health"
    protocol = "http"
    models = ["llama-3.1-8b"]
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from shared.config.loader import Context, Secret, load, read_secret, setting
from shared.config.values import (
    HostPort,
    check_host,
    check_http_url,
    parse_hostport,
    parse_mac,
    split_rule,
)


@dataclass(frozen=True)
class WolConfig:
    """Where and how magic packets for one node are sent."""

    broadcast: str = setting("255.255.255.255", help="directed broadcast of the node's LAN")
    port: int = setting(9, min=1, max=65535, help="UDP port (7 or 9 are usual)")
    source: str | None = setting(None, help="local address to send from (picks the NIC)")
    password: str | None = setting(None, help="SecureOn password: 6 bytes as a MAC or 12 hex")

    def check(self, ctx: Context, key: str) -> None:
        if self.password is not None:
            parse_mac(self.password, ctx, f"{key}.password")
        # magic packets go out as raw datagrams: a host name would be resolved at wake time,
        # when DNS may be the very box that sleeps
        for field in ("broadcast", "source"):
            value = getattr(self, field)
            if value is None:
                continue
            try:
                ipaddress.ip_address(value)
            except ValueError:
                raise ctx.error(f"{key}.{field}", f"found {value!r}; expected an IP address such "
                                f"as \"192.168.1.255\"") from None

    @property
    def password_bytes(self) -> bytes:
        return b"" if self.password is None else bytes.fromhex(
            self.password.replace(":", "").replace("-", "")
        )


@dataclass(frozen=True)
class NodeConfig:
    """One GPU box: where it is, how to wake it and how patiently."""

    host: str
    mac: str
    wol: WolConfig = setting(default_factory=WolConfig)
    wol_interval_s: float = setting(2.0, min=0.05, max=3600)
    wake_timeout_s: float = setting(180.0, min=0.1, max=86400)
    probe_interval_s: float = setting(1.0, min=0.01, max=3600)
    probe_timeout_s: float = setting(0.5, min=0.01, max=60,
                                     help="connect timeout of probes and of relays to the node")
    drain_timeout_s: float = setting(120.0, min=0.1, max=86400,
                                     help="after an agreed `suspending`, how long to wait for it")
    wake_cooldown_s: float = setting(30.0, min=0, max=86400,
                                     help="after a failed wake, requests fail at once this long")
    max_held: int = setting(2000, min=0, max=1_000_000, help="held connections for this node")
    veto_suspend_when_busy: bool = setting(True, help="refuse `suspending` while relays are open")
    # Energy: the host's draw beside its GPUs (NVML reports those), measured at the wall.
    host_idle_watts: float = setting(40.0, min=0, max=100_000,
                                     help="awake and idle, GPUs excluded (wall meter)")
    host_sleep_watts: float = setting(2.0, min=0, max=100_000,
                                      help="suspended (wall meter)")
    agent_url: str | None = setting(None, help="the node-agent's API, http://HOST:PORT: model "
                                    "lists and loads of on-demand models")
    agent_token: Secret | None = None
    agent_token_file: Path | None = setting(None, help="file with the agent API's bearer token")
    load_timeout_s: float = setting(300.0, min=0.1, max=86400,
                                    help="a request for an on-demand model waits this long "
                                    "for the agent to load it")
    asleep_probe_interval_s: float = setting(
        60.0, min=0, max=86400,
        help="probe an ASLEEP node this often to see it come up by itself (0: never)")
    learn_models_wake: bool = setting(
        True, help="wake the node once to learn its models when nothing tells what it serves")

    def check(self, ctx: Context, key: str) -> None:
        check_host(self.host, ctx, f"{key}.host")
        parse_mac(self.mac, ctx, f"{key}.mac")
        if self.agent_url is not None:
            check_http_url(self.agent_url, ctx, f"{key}.agent_url")
        elif self.agent_token is not None or self.agent_token_file is not None:
            raise ctx.error(f"{key}.agent_url", "missing; a token is set but no agent_url to "
                            "send it to (set agent_url = \"http://HOST:PORT\")")
        object.__setattr__(self, "agent_token", _agent_token(self, ctx, key))
        if self.probe_timeout_s >= self.wake_timeout_s:
            raise ctx.error(f"{key}.probe_timeout_s", f"found {self.probe_timeout_s:g}; expected "
                            f"less than wake_timeout_s ({self.wake_timeout_s:g})")
        # the first packet goes out at once; one interval past the timeout would be the only resend
        if self.wol_interval_s > self.wake_timeout_s:
            raise ctx.error(f"{key}.wol_interval_s", f"found {self.wol_interval_s:g}; expected at "
                            f"most wake_timeout_s ({self.wake_timeout_s:g}) so packets are resent")

    @property
    def mac_bytes(self) -> bytes:
        return bytes.fromhex(self.mac.replace(":", "").replace("-", ""))


def _agent_token(node: NodeConfig, ctx: Context, key: str) -> Secret | None:
    """``read_secret`` for the agent_-prefixed keys (its messages name token/token_file)."""
    if node.agent_token_file is None:
        return node.agent_token
    if node.agent_token is not None:
        raise ctx.error(f"{key}.agent_token_file", "set either agent_token or agent_token_file, "
                        "not both")
    try:
        text = node.agent_token_file.read_text().strip()
    except OSError as exc:
        raise ctx.error(f"{key}.agent_token_file", f"cannot read {node.agent_token_file}: "
                        f"{exc.strerror}") from exc
    if not text:
        raise ctx.error(f"{key}.agent_token_file", f"{node.agent_token_file} is empty; put the "
                        "token in it")
    return Secret(text)


Readiness = str  # "tcp" or "http:/path"

# What frontends poll on page load or on a timer; answered from the last good response
# while the node sleeps instead of waking it.
DEFAULT_NO_WAKE: tuple[str, ...] = (
    "GET /v1/models", "GET /models", "GET /health", "GET /props", "GET /api/tags", "GET /slots",
    "GET /metrics",
)


@dataclass(frozen=True)
class HttpOptions:
    """Options of an HTTP-aware listener (``protocol = "http"``), shared by its routes."""

    no_wake: list[str] = setting(default_factory=lambda: list(DEFAULT_NO_WAKE),
                                 help='"METHOD /path" rules (* matches any run of characters)')
    waking_comment_interval_s: float = setting(5.0, min=0.01, max=3600,
                                               help="SSE comments to held streaming requests")
    client_keepalive_s: float = setting(60.0, min=0, max=3600,
                                        help="idle keep-alive of client connections")
    max_request_bytes: int = setting(64 << 20, min=1024, max=1 << 31)
    request_body_timeout_s: float = setting(
        30.0, min=0.01, max=3600, help="time to receive a request body once its head is in")
    poll_refresh_s: float = setting(
        30.0, min=0, max=86400,
        help="an awake node gets one no-wake poll per path this often; the rest are answered "
             "from the last answer (0: relay every poll)")

    def check(self, ctx: Context, key: str) -> None:
        for i, rule in enumerate(self.no_wake):
            try:
                split_rule(rule)  # the listener parses the rules with it, so no rule fails there
            except ValueError as exc:
                raise ctx.error(f"{key}.no_wake[{i}]", str(exc)) from None


@dataclass(frozen=True)
class RouteConfig:
    """A listener on the proxy and the backend port it stands for."""

    listen: str
    node: str
    backend_port: int = setting(min=1, max=65535)
    ready: Readiness = setting("tcp", help='"tcp" or "http:/health"')
    protocol: Literal["tcp", "http"] = "tcp"
    models: list[str] = setting(default_factory=list,
                                help="models this node serves (http; more are learned)")
    http: HttpOptions | None = None
    # HAProxy's `timeout server` / `timeout client`: a model may think for minutes before its
    # first token, so the upstream gets as long as a kept-alive idle client.
    upstream_idle_timeout_s: float = setting(
        600.0, min=0.01, max=7 * 86400,
        help="end a relay/request when the client waits and the backend sends nothing this long")
    client_idle_timeout_s: float = setting(
        600.0, min=0.01, max=7 * 86400,
        help="end a TCP relay when the backend spoke last and the client sends nothing this long")

    def check(self, ctx: Context, key: str) -> None:
        parse_hostport(self.listen, ctx, f"{key}.listen", allow_port_zero=True)
        for name, value in (("models", self.models), ("http", self.http)):
            if value and self.protocol != "http":
                raise ctx.error(f"{key}.{name}", 'only for HTTP routes; set protocol = "http"')
        if self.ready != "tcp" and not (self.ready.startswith("http:/") and " " not in self.ready):
            raise ctx.error(f"{key}.ready", f'found {self.ready!r}; allowed: "tcp" or "http:/PATH"')

    @property
    def listen_addr(self) -> HostPort:
        host, _, port = self.listen.rpartition(":")
        return HostPort(host.strip("[]"), int(port))

    @property
    def ready_http_path(self) -> str | None:
        """The readiness path for ``http:/path`` checks, or None for plain TCP."""
        return self.ready[len("http:"):] if self.ready.startswith("http:") else None


@dataclass(frozen=True)
class ControlConfig:
    """The control endpoint: /status, /metrics and agent events."""

    listen: str = "127.0.0.1:9180"
    token: Secret | None = None
    token_file: Path | None = None

    def check(self, ctx: Context, key: str) -> None:
        addr = parse_hostport(self.listen, ctx, f"{key}.listen", allow_port_zero=True)
        object.__setattr__(self, "token", read_secret(self.token, self.token_file, ctx, key))
        if self.token is None and not addr.is_loopback:
            raise ctx.error(f"{key}.token", f"missing while listening on {self.listen}; "
                            "set token_file, or listen on 127.0.0.1")

    @property
    def listen_addr(self) -> HostPort:
        host, _, port = self.listen.rpartition(":")
        return HostPort(host.strip("[]"), int(port))


@dataclass(frozen=True)
class LimitsConfig:
    """Bounds that keep a crowd of held clients from taking the proxy down."""

    max_held_total: int = setting(10_000, min=0, max=1_000_000)
    hold_buffer_bytes: int = setting(1 << 20, min=1024, max=1 << 30,
                                     help="client bytes kept per held connection")
    shutdown_grace_s: float = setting(10.0, min=0, max=3600)


DEFAULT_STATE_DIR = Path("/var/lib/llamanap")
HISTORY_FILE = "history.sqlite3"


@dataclass(frozen=True)
class HistoryConfig:
    """Where the proxy keeps its history (requests, wakes, power states) and for how long."""

    enabled: bool = False
    path: Path | None = setting(None, help="the SQLite file (default STATE_DIR/history.sqlite3)")
    state_dir: Path | None = setting(None, help=f"folder for the file (default {DEFAULT_STATE_DIR})")
    retention_days: float = setting(90.0, min=0.01, max=36_500)
    max_mib: float = setting(512.0, min=1, max=1 << 20, help="oldest rows go above this size")
    price_per_kwh: float | None = setting(None, min=0, max=1000,
                                          help="shows energy as money in `edge-proxy energy`")
    currency: str = setting("", help='printed after money, e.g. "EUR"')

    def check(self, ctx: Context, key: str) -> None:
        if self.path is not None and self.state_dir is not None:
            raise ctx.error(f"{key}.state_dir", "set either path or state_dir, not both")
        if len(self.currency) > 8:
            raise ctx.error(f"{key}.currency", f"found {self.currency!r}; expected a short unit "
                            'such as "EUR" or "$"')

    @property
    def db_path(self) -> Path:
        """The database file history is written to and read from."""
        return self.path or (self.state_dir or DEFAULT_STATE_DIR) / HISTORY_FILE


@dataclass(frozen=True)
class AlertsConfig:
    """When the proxy raises an alert (a log line, ``edge_alerts_total`` and, if set,
    ``alert_command`` with the alert as JSON on stdin), at most once per key per
    ``alert_repeat_s``. A threshold left unset raises no alert of its kind."""

    gpu_temp_c: float | None = setting(90.0, min=1, max=200, help="a GPU at or above this")
    gpu_memory_pct: float | None = setting(None, min=1, max=100,
                                           help="GPU memory used at or above this share")
    crash_loop_count: int = setting(3, min=1, max=1000, help="crashes of one instance ...")
    crash_loop_window_s: float = setting(600.0, min=1, max=7 * 86400, help="... within this")
    alert_command: list[str] | None = setting(None, help="argv; the alert as JSON on stdin")
    alert_command_timeout_s: float = setting(10.0, min=0.1, max=3600)
    alert_repeat_s: float = setting(3600.0, min=0, max=7 * 86400,
                                    help="one alert per key at most this often")

    def check(self, ctx: Context, key: str) -> None:
        if self.alert_command is not None and (not self.alert_command or not self.alert_command[0]):
            raise ctx.error(f"{key}.alert_command", "empty; expected an argv such as "
                            '["/usr/local/bin/notify", "--to", "ops"]')


@dataclass(frozen=True)
class EdgeConfig:
    """The whole edge-proxy config file."""

    nodes: dict[str, NodeConfig]
    routes: list[RouteConfig]
    control: ControlConfig = setting(default_factory=ControlConfig)
    limits: LimitsConfig = setting(default_factory=LimitsConfig)
    alerts: AlertsConfig = setting(default_factory=AlertsConfig)
    history: HistoryConfig = setting(default_factory=HistoryConfig)
    state_dir: Path | None = setting(
        None, help="where the proxy keeps what each node serves across restarts")
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    def check(self, ctx: Context, key: str) -> None:
        if not self.nodes:
            raise ctx.error("nodes", "empty; define at least one [nodes.NAME] table")
        if not self.routes:
            raise ctx.error("routes", "empty; define at least one [[routes]] table")
        control = self.control.listen_addr
        for i, route in enumerate(self.routes):
            if route.node not in self.nodes:
                known = ", ".join(sorted(self.nodes))
                raise ctx.error(f"routes[{i}].node", f"found {route.node!r}; known nodes: {known}")
            addr = route.listen_addr
            if addr.overlaps(control):
                raise ctx.error(f"routes[{i}].listen", f"{route.listen} takes the port of "
                                f"control.listen ({self.control.listen}); use another port")
            for j, other in enumerate(self.routes[:i]):
                if not addr.overlaps(other.listen_addr):
                    continue
                if route.listen != other.listen:
                    # a wildcard beside a specific address, or one address spelt two ways: two
                    # listeners on one port, and the second fails to bind at run time
                    raise ctx.error(f"routes[{i}].listen", f"{route.listen} takes the port of "
                                    f"routes[{j}].listen ({other.listen}); use another port")
                if not _shares_listener(other, route):
                    both = f"both go to node {route.node} backend_port {route.backend_port}; " \
                        if _backend(other) == _backend(route) else ""
                    raise ctx.error(f"routes[{i}].listen", f"{addr} is also routes[{j}].listen; "
                                    f"use another port ({both}only protocol = \"http\" routes to "
                                    "different nodes or backend ports may share one)")
                if None not in (other.http, route.http) and other.http != route.http:
                    raise ctx.error(f"routes[{i}].http", f"differs from routes[{j}].http on the "
                                    "same listener; set it on one of them only")


def _shares_listener(a: RouteConfig, b: RouteConfig) -> bool:
    """HTTP routes on one address form one listener that routes by model across backends:
    nodes, or instances of one node on different ports."""
    return a.protocol == b.protocol == "http" and _backend(a) != _backend(b)


def _backend(route: RouteConfig) -> tuple[str, int]:
    return route.node, route.backend_port


def load_edge_config(path: Path) -> EdgeConfig:
    """Read and check an edge-proxy config file."""
    return load(EdgeConfig, path)
