"""What a valid config will do that its reader may not expect, in a few lines for check-config.

A config can pass every check and still surprise: an empty agent file, with the defaults,
suspends the machine after 15 idle minutes. ``node_notes`` and ``edge_notes`` list such
consequences, each one line that names the key to change.
"""

from __future__ import annotations

from shared.config.edge import EdgeConfig, WolConfig
from shared.config.node import NodeAgentConfig, PowerSection

_DEFAULT_IDLE_TIMEOUT_S = PowerSection().idle_timeout_s
_DEFAULT_BROADCAST = WolConfig().broadcast


def node_notes(cfg: NodeAgentConfig) -> list[str]:
    """The surprising consequences of a node-agent config, most important first."""
    notes: list[str] = []
    power = cfg.power
    enabled = [name for name, inst in cfg.instances.items() if inst.enabled]
    if power.enabled:
        default = ", the default" if power.idle_timeout_s == _DEFAULT_IDLE_TIMEOUT_S else ""
        notes.append(f"power: will suspend this machine after {power.idle_timeout_s:g} s "
                     f"without use (power.idle_timeout_s{default}); set power.enabled = false "
                     "to never suspend")
    if not cfg.instances:
        notes.append("instances: none defined; the agent supervises nothing (add "
                     "[instances.NAME] or agent.instances_dir)")
    elif not enabled:
        notes.append(f"instances: all {len(cfg.instances)} disabled; nothing starts until "
                     "`node-agent enable NAME`")
    if power.enabled and not enabled:
        notes.append("power: no instance is enabled, so nothing served here keeps the machine "
                     "awake (only inhibits, busy_command and the other power.watch_* checks)")
    if cfg.proxy is None and power.enabled:
        notes.append("proxy: not configured; no edge proxy is asked before a suspend or told "
                     "after a resume (it finds out by probing)")
    if power.enabled and not power.watch_connections:
        notes.append("power.watch_connections: false; open client connections do not keep "
                     "the machine awake")
    return notes


def edge_notes(cfg: EdgeConfig) -> list[str]:
    """The surprising consequences of an edge-proxy config."""
    notes: list[str] = []
    used = {route.node for route in cfg.routes}
    for name, node in cfg.nodes.items():
        if name not in used:
            notes.append(f"nodes.{name}: no route uses it; it is woken only by "
                         f"`edge-proxy wake {name}`")
        if node.wol.broadcast == _DEFAULT_BROADCAST:
            notes.append(f"nodes.{name}.wol.broadcast: not set; magic packets go to "
                         f"{_DEFAULT_BROADCAST} on the default interface (set the LAN's "
                         "directed broadcast, such as 192.168.1.255)")
        if node.max_held == 0:
            notes.append(f"nodes.{name}.max_held: 0; while it sleeps, connections are "
                         "refused instead of held")
    if cfg.limits.max_held_total == 0:
        notes.append("limits.max_held_total: 0; while a node sleeps, every connection is "
                     "refused instead of held")
    wildcard = [r.listen for r in cfg.routes if r.listen_addr.host in ("0.0.0.0", "::")]
    if cfg.control.token is None and wildcard and cfg.control.listen_addr.is_loopback:
        notes.append(f"control.listen: {cfg.control.listen} (loopback); an agent on another "
                     "machine cannot send its events (set listen and token_file)")
    return notes
