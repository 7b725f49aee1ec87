"""``node-agent doctor``: check what suspend, wake and P-states need on this box, and say how
to fix what is missing. It changes nothing: no suspend, no setting written, no packet sent.

The checks, in the order they are reported: Wake-on-LAN on the NIC, sleep states, the selected
mem_sleep mode, permission to suspend, the system-sleep hook, the NVIDIA suspend services and
video memory preservation, libnvidia-api, P-states per GPU, llama-server, the proxy and
whether the MAC it wakes for this node is a NIC of this box.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from inference_node.doctor.nvidia import (
    check_gpu_pstates,
    check_nvapi,
    check_nvidia_services,
    check_preserve_vram,
)
from inference_node.doctor.services import check_llama_server, check_proxy
from inference_node.doctor.system import (
    check_mem_sleep,
    check_sleep_hook,
    check_suspend_permission,
    check_suspend_states,
    check_wake_on_lan,
)
from inference_node.gpu.inventory import GpuInventory, open_inventory
from shared.config.node import DEFAULT_CONFIG, NodeAgentConfig, load_node_config
from shared.doctor import CheckResult, Host, RealHost, add_output_arguments, report, skip

DESCRIPTION = """\
Check this GPU box for what llamanap needs: Wake-on-LAN on the NIC, suspend to RAM (deep),
permission to suspend, the sleep hook, the NVIDIA suspend services, libnvidia-api and P-states
per GPU, llama-server, the proxy (reached with the token) and the MAC it wakes. Each failure
comes with its fix. Nothing is changed. Exit code 0 when nothing failed, 1 otherwise. Run it as the user the agent
runs as (usually root) to see what the agent will see.
"""


def run_checks(host: Host, cfg: NodeAgentConfig | None, *, interface: str | None,
               inventory: GpuInventory) -> list[CheckResult]:
    """Every check against ``host``, ``cfg`` (None: no config file) and ``inventory``."""
    power_off = cfg is not None and not cfg.power.enabled
    pstates_off = cfg is not None and not cfg.pstate.enabled
    results = [
        *_unless(power_off, "power.enabled = false: this box never suspends", [
            check_wake_on_lan(host, interface),
            check_suspend_states(host),
            check_mem_sleep(host),
            check_suspend_permission(host),
            check_sleep_hook(host),
            check_nvidia_services(host),
            check_preserve_vram(host),
        ]),
        *_unless(pstates_off, "pstate.enabled = false", [check_nvapi(host)]),
        *check_gpu_pstates(host, inventory),
        *check_llama_server(cfg),
        *check_proxy(cfg, host, interface),
    ]
    return results


def _unless(off: bool, why: str, results: list[CheckResult]) -> list[CheckResult]:
    """The results, or each turned into a skip that says why it does not matter here."""
    return [skip(r.name, f"{why} ({r.status.value}: {r.detail})") if off else r for r in results]


def _config(path: Path | None) -> NodeAgentConfig | None:
    """The named config (errors are errors), else the default one if it exists, else None."""
    if path is not None:
        return load_node_config(path)
    return load_node_config(DEFAULT_CONFIG) if DEFAULT_CONFIG.exists() else None


def _doctor(args: argparse.Namespace) -> int:
    cfg = _config(args.config)
    inventory = open_inventory()
    try:
        results = run_checks(RealHost(), cfg, interface=args.interface, inventory=inventory)
    finally:
        close = getattr(inventory, "close", None)
        if close is not None:
            close()
    return report(results, as_json=args.json, out=sys.stdout)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("doctor", help="check this box for suspend, wake and GPU support",
                       description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=None,
                   help=f"the agent's config (default: {DEFAULT_CONFIG} if it exists)")
    p.add_argument("--interface", metavar="IF", default=None,
                   help="the NIC that must wake the box (default: the default route's)")
    add_output_arguments(p)
    p.set_defaults(func=_doctor)
