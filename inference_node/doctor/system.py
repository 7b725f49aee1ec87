"""Checks of the machine itself: Wake-on-LAN on the NIC, sleep states, permission to suspend,
and the system-sleep hook. Each reads the machine through ``shared.doctor.Host`` only.
"""

from __future__ import annotations

import re
from typing import Final

from shared.doctor import CheckResult, Host, fail, ok, skip, warn

WOL_CHECK: Final = "wake-on-lan"
SUSPEND_CHECK: Final = "suspend"
MEM_SLEEP_CHECK: Final = "mem-sleep"
PERMISSION_CHECK: Final = "suspend-permission"
HOOK_CHECK: Final = "sleep-hook"

RTF_UP: Final = 0x1  # /proc/net/route flag: the route is usable
IFF_LOOPBACK: Final = 0x8  # /sys/class/net/IF/flags
MAGIC: Final = "g"  # ethtool's letter for waking on a magic packet
HOOK_NAME: Final = "llamanap"
# Where systemd-sleep looks for hooks (the /etc and /usr/local ones since systemd 256).
HOOK_DIRS: Final = ("/usr/lib/systemd/system-sleep", "/lib/systemd/system-sleep",
                    "/usr/local/lib/systemd/system-sleep", "/etc/systemd/system-sleep")
LOGIND_CAN_SUSPEND: Final = ("busctl", "call", "org.freedesktop.login1", "/org/freedesktop/login1",
                             "org.freedesktop.login1.Manager", "CanSuspend")
POLKIT_RULE: Final = ('/etc/polkit-1/rules.d/50-llamanap.rules: polkit.addRule(function(a, s) '
                      '{ if (a.id == "org.freedesktop.login1.suspend" && s.user == "USER") '
                      'return polkit.Result.YES; });')


def default_route_interface(host: Host) -> str | None:
    """The interface of the IPv4 default route with the lowest metric, from /proc/net/route."""
    text = host.read_text("/proc/net/route") or ""
    best: tuple[int, str] | None = None
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        iface, dest, flags, metric, mask = fields[0], fields[1], fields[3], fields[6], fields[7]
        try:
            usable = int(flags, 16) & RTF_UP and int(dest, 16) == 0 and int(mask, 16) == 0
            rank = int(metric)
        except ValueError:
            continue
        if usable and (best is None or rank < best[0]):
            best = (rank, iface)
    return None if best is None else best[1]


def _is_loopback(host: Host, iface: str) -> bool:
    try:
        return bool(int((host.read_text(f"/sys/class/net/{iface}/flags") or "0"), 16) & IFF_LOOPBACK)
    except ValueError:
        return iface == "lo"


def _persist_fix(iface: str) -> str:
    return (f"`ethtool -s {iface} wol g`; to keep it, copy deploy/examples/50-wol.link to "
            "/etc/systemd/network/ (set its MACAddress) or `nmcli c modify CONNECTION "
            "802-3-ethernet.wake-on-lan magic`; enable Wake-on-LAN in the firmware setup too")


def check_wake_on_lan(host: Host, interface: str | None) -> CheckResult:
    """Whether the NIC wakes the machine on a magic packet (ethtool if installed, else sysfs)."""
    iface = interface or default_route_interface(host)
    if iface is None:
        return fail(WOL_CHECK, "no default route, so no NIC to check",
                    "name the NIC the proxy reaches this box on: `node-agent doctor --interface IF`")
    sys_dir = f"/sys/class/net/{iface}"
    if not host.exists(sys_dir):
        known = ", ".join(n for n in host.list_dir("/sys/class/net") if n != "lo") or "none"
        return fail(WOL_CHECK, f"no network interface {iface!r} (interfaces: {known})",
                    "pass --interface with one of those names")
    if _is_loopback(host, iface):
        return fail(WOL_CHECK, f"{iface} is the loopback interface",
                    "pass --interface with the NIC the proxy reaches this box on")
    if not host.exists(f"{sys_dir}/device"):
        lower = [n.removeprefix("lower_") for n in host.list_dir(sys_dir) if n.startswith("lower_")]
        lower += host.list_dir(f"{sys_dir}/brif")
        under = f" (ports: {', '.join(lower)})" if lower else ""
        return warn(WOL_CHECK, f"{iface} is a virtual interface{under}: Wake-on-LAN lives on the "
                    "physical NIC", "run `node-agent doctor --interface PHYSICAL_NIC`")
    done = host.run(["ethtool", iface])
    if done is not None:
        return _from_ethtool(host, iface, done.stdout, done.output)
    wakeup = (host.read_text(f"{sys_dir}/device/power/wakeup") or "").strip()
    if wakeup == "enabled":
        return ok(WOL_CHECK, f"{iface}: device may wake the system (sysfs; install ethtool to see "
                  "whether magic packets are on)")
    if wakeup == "disabled":
        return fail(WOL_CHECK, f"{iface}: {sys_dir}/device/power/wakeup is disabled",
                    f"`echo enabled > {sys_dir}/device/power/wakeup`, and {_persist_fix(iface)}")
    return warn(WOL_CHECK, f"{iface}: cannot tell: ethtool is not installed and the device has no "
                "power/wakeup attribute (a virtual NIC cannot wake the machine)",
                f"install ethtool and run the doctor again; then {_persist_fix(iface)}")


def _from_ethtool(host: Host, iface: str, stdout: str, output: str) -> CheckResult:
    supports = current = None
    for line in stdout.splitlines():
        key, sep, value = line.strip().partition(":")
        if sep and key == "Supports Wake-on":
            supports = value.strip()
        elif sep and key == "Wake-on":
            current = value.strip()
    if supports is None or current is None:
        if host.euid() != 0:
            return warn(WOL_CHECK, f"{iface}: ethtool shows Wake-on only to root ({output[:120]})",
                        "run `sudo node-agent doctor`")
        return fail(WOL_CHECK, f"{iface}: ethtool reports no Wake-on-LAN support ({output[:120]})",
                    "use a NIC that supports Wake-on-LAN (onboard NICs usually do; many USB "
                    "adapters and virtual NICs do not)")
    if MAGIC not in supports:
        return fail(WOL_CHECK, f"{iface}: Supports Wake-on: {supports}: no magic packet ('g')",
                    "use a NIC that supports Wake-on-LAN by magic packet")
    if MAGIC not in current:
        return fail(WOL_CHECK, f"{iface}: Wake-on: {current} (supports {supports}): magic packet "
                    "wake is off", _persist_fix(iface))
    return ok(WOL_CHECK, f"{iface}: Wake-on: {current} (magic packet); the firmware setting "
              "cannot be read from here")


def check_suspend_states(host: Host) -> CheckResult:
    """Whether the kernel offers suspend to RAM (``mem`` in /sys/power/state)."""
    text = host.read_text("/sys/power/state")
    no_sleep_fix = ("run node-agent on the GPU box itself (not in a VM or container); enable "
                    "sleep states in the firmware; or set power.enabled = false")
    if text is None:
        return fail(SUSPEND_CHECK, "/sys/power/state is missing: the kernel has no power "
                    "management", no_sleep_fix)
    states = text.split()
    if "mem" in states:
        return ok(SUSPEND_CHECK, f"the kernel can suspend to RAM (states: {' '.join(states)})")
    if "freeze" in states:
        return warn(SUSPEND_CHECK, f"only suspend-to-idle (states: {' '.join(states)}): the box "
                    "stays partly powered", "enable S3 sleep in the firmware setup")
    return fail(SUSPEND_CHECK, "/sys/power/state is empty: this kernel offers no sleep state",
                no_sleep_fix)


def check_mem_sleep(host: Host) -> CheckResult:
    """Which suspend-to-RAM flavour is selected: ``[deep]`` (S3) is ok, s2idle a warning."""
    text = host.read_text("/sys/power/mem_sleep")
    if text is None:
        return skip(MEM_SLEEP_CHECK, "no /sys/power/mem_sleep (no suspend to RAM to choose)")
    modes = text.split()
    selected = next((m.strip("[]") for m in modes if m.startswith("[")), None)
    names = [m.strip("[]") for m in modes]
    if selected == "deep":
        return ok(MEM_SLEEP_CHECK, f"deep (S3) is selected ({text.strip()})")
    if "deep" in names:
        return warn(MEM_SLEEP_CHECK, f"{selected} is selected, deep is available ({text.strip()})",
                    "`echo deep > /sys/power/mem_sleep` now; add the kernel parameter "
                    "mem_sleep_default=deep to keep it")
    return warn(MEM_SLEEP_CHECK, f"only {' '.join(names)}: suspend-to-idle keeps the box partly "
                "powered and some GPUs awake", "select \"S3\" / \"Linux\" sleep in the firmware "
                "setup, then add the kernel parameter mem_sleep_default=deep")


def check_suspend_permission(host: Host) -> CheckResult:
    """Whether this user may suspend, asked of logind (``CanSuspend``) without suspending."""
    root = host.euid() == 0
    done = host.run(LOGIND_CAN_SUSPEND)
    answer = None
    if done is not None and done.returncode == 0:
        found = re.search(r'"(\w+)"', done.stdout)
        answer = found[1] if found else None
    if answer == "yes":
        return ok(PERMISSION_CHECK, f"logind allows suspend (uid {host.euid()})")
    if answer == "challenge":
        return fail(PERMISSION_CHECK, "logind would ask for a password (polkit), which the "
                    "service cannot give", f"run node-agent as root, or add a polkit rule: {POLKIT_RULE}")
    if answer == "no":
        return fail(PERMISSION_CHECK, "logind refuses suspend to this user",
                    f"run node-agent as root, or add a polkit rule: {POLKIT_RULE}")
    if answer is not None:  # "na": logind knows the machine cannot suspend
        return fail(PERMISSION_CHECK, f"logind says suspend is {answer!r} on this machine",
                    "see the suspend check: the kernel or firmware offers no sleep state")
    why = "busctl is not installed" if done is None else f"logind did not answer ({done.output})"
    if root:
        return warn(PERMISSION_CHECK, f"running as root, but {why}: `systemctl suspend` needs "
                    "systemd-logind", "run on a systemd host, or set power.suspend_command")
    return fail(PERMISSION_CHECK, f"not root and {why}, so no permission to suspend can be "
                "granted", "run node-agent as root on a systemd host, or set power.suspend_command")


def check_sleep_hook(host: Host) -> CheckResult:
    """Whether the system-sleep hook that tells the agent ``pre``/``post`` is installed."""
    for folder in HOOK_DIRS:
        if host.exists(f"{folder}/{HOOK_NAME}"):
            return ok(HOOK_CHECK, f"{folder}/{HOOK_NAME} is installed")
    return warn(HOOK_CHECK, "no llamanap system-sleep hook: resume is seen later, from logind or "
                "the clocks", f"`install -m 755 deploy/system-sleep/{HOOK_NAME} {HOOK_DIRS[0]}/`")
