"""``node-agent doctor``.

The pass and fail branches run against a copy of /sys and /proc made of real files in a temp
folder, with small shell scripts standing in for ethtool, systemctl and busctl (the NIC, the
driver's units and logind are the hardware boundary). The doctor also runs for real against
this machine, which has no GPU and no NVIDIA driver: it must say so, not crash.
"""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from edge_proxy.service import Proxy, serve_proxy
from inference_node.doctor import run_checks
from inference_node.doctor.nvidia import (
    check_gpu_pstates,
    check_nvapi,
    check_nvidia_services,
    check_preserve_vram,
)
from inference_node.doctor.services import check_llama_server, check_proxy, check_wake_mac
from inference_node.doctor.system import (
    check_mem_sleep,
    check_sleep_hook,
    check_suspend_permission,
    check_suspend_states,
    check_wake_on_lan,
    default_route_interface,
)
from inference_node.gpu.inventory import GpuInfo, NoGpus
from shared.config.node import NodeAgentConfig, load_node_config
from shared.doctor import CheckResult, RealHost, Status, render_json, render_table
from tests.fakes.gpu import FakeGpu, FakeNvml, FakeRig
from tests.support.edge import MAC, TEST_TIMEOUT_S, PacketListener, free_port, load_config

REPO = Path(__file__).resolve().parent.parent
SUBPROCESS_TIMEOUT_S = 60.0  # a bound for a hung child on a loaded machine, not a timing check

ROUTE_HEADER = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n"
ETHTOOL_MAGIC_ON = "Settings for eno1:\n\tSupports Wake-on: pumbg\n\tWake-on: g\n\tLink detected: yes\n"


class TreeHost(RealHost):
    """The real host code over a temp tree and a folder of scripts, with a chosen user id and
    a chosen answer for loading libraries (the NVIDIA libraries are the hardware)."""

    def __init__(self, root: Path, *, uid: int = 0, libraries: dict[str, str | None] | None = None):
        super().__init__(root, path=str(root / "bin"))
        (root / "bin").mkdir(parents=True, exist_ok=True)
        self.uid = uid
        self.libraries = libraries or {}

    def euid(self) -> int:
        return self.uid

    def load_library(self, name: str) -> str | None:
        return self.libraries.get(name, f"{name}: cannot open shared object file")

    def file(self, path: str, text: str = "") -> TreeHost:
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        return self

    def program(self, name: str, script: str) -> TreeHost:
        """A shell script called ``name`` on this host's PATH."""
        path = self.root / "bin" / name
        path.write_text("#!/bin/sh\n" + script + "\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
        return self


@pytest.fixture
def host(tmp_path: Path) -> TreeHost:
    return TreeHost(tmp_path / "root")


def nic(host: TreeHost, name: str = "eno1", wakeup: str | None = None) -> TreeHost:
    host.file(f"/sys/class/net/{name}/device/vendor", "0x8086\n")
    if wakeup is not None:
        host.file(f"/sys/class/net/{name}/device/power/wakeup", wakeup + "\n")
    return host


# --- Wake-on-LAN -------------------------------------------------------------------------------

def test_default_route_interface_takes_the_lowest_metric_default_route(host: TreeHost) -> None:
    host.file("/proc/net/route", ROUTE_HEADER
              + "wlan0\t00000000\t0102A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0\n"
              + "eno1\t0002A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
              + "eno1\t00000000\t0102A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n"
              + "down0\t00000000\t0102A8C0\t0002\t0\t0\t1\t00000000\t0\t0\t0\n")
    assert default_route_interface(host) == "eno1"
    assert default_route_interface(TreeHost(host.root / "empty")) is None


def test_wol_on_through_ethtool_is_ok(host: TreeHost) -> None:
    nic(host).program("ethtool", f"printf '{ETHTOOL_MAGIC_ON}'")
    result = check_wake_on_lan(host, "eno1")
    assert result.status is Status.OK, result
    assert "Wake-on: g" in result.detail


def test_wol_off_fails_with_the_ethtool_command_and_how_to_persist_it(host: TreeHost) -> None:
    nic(host).program("ethtool", "printf '\\tSupports Wake-on: pumbg\\n\\tWake-on: d\\n'")
    result = check_wake_on_lan(host, "eno1")
    assert result.status is Status.FAIL
    assert "Wake-on: d" in result.detail
    assert "ethtool -s eno1 wol g" in result.fix
    assert "50-wol.link" in result.fix and "wake-on-lan magic" in result.fix


def test_wol_without_magic_packet_support_fails(host: TreeHost) -> None:
    nic(host).program("ethtool", "printf '\\tSupports Wake-on: pumb\\n\\tWake-on: d\\n'")
    result = check_wake_on_lan(host, "eno1")
    assert result.status is Status.FAIL
    assert "no magic packet" in result.detail


def test_ethtool_hides_wol_from_non_root_and_the_doctor_says_run_as_root(host: TreeHost) -> None:
    nic(host).program("ethtool", "echo 'Settings for eno1:'; "
                      "echo 'Cannot get wake-on-lan settings: Operation not permitted' >&2")
    host.uid = 1000
    assert check_wake_on_lan(host, "eno1").status is Status.WARN
    host.uid = 0  # root sees no Wake-on lines: the NIC has none
    assert check_wake_on_lan(host, "eno1").status is Status.FAIL


@pytest.mark.parametrize(("wakeup", "status"), [
    ("enabled", Status.OK), ("disabled", Status.FAIL), (None, Status.WARN)])
def test_wol_from_sysfs_when_ethtool_is_missing(host: TreeHost, wakeup: str | None,
                                                status: Status) -> None:
    result = check_wake_on_lan(nic(host, wakeup=wakeup), "eno1")
    assert result.status is status, result
    if status is Status.FAIL:
        assert "echo enabled > /sys/class/net/eno1/device/power/wakeup" in result.fix


def test_wol_uses_the_default_route_interface(host: TreeHost) -> None:
    nic(host, "enp5s0", wakeup="enabled")
    host.file("/proc/net/route", ROUTE_HEADER + "enp5s0\t00000000\t0102A8C0\t0003\t0\t0\t0\t"
              "00000000\t0\t0\t0\n")
    result = check_wake_on_lan(host, None)
    assert result.status is Status.OK
    assert result.detail.startswith("enp5s0:")


def test_wol_names_unknown_and_virtual_interfaces(host: TreeHost) -> None:
    nic(host, "eno1")
    host.file("/sys/class/net/br0/brif/eno1")
    missing = check_wake_on_lan(host, "eth9")
    assert missing.status is Status.FAIL
    assert "eth9" in missing.detail and "br0" in missing.detail and "eno1" in missing.detail
    bridge = check_wake_on_lan(host, "br0")
    assert bridge.status is Status.WARN
    assert "eno1" in bridge.detail and "--interface" in bridge.fix
    host.file("/sys/class/net/lo/flags", "0x9\n")
    loopback = check_wake_on_lan(host, "lo")
    assert loopback.status is Status.FAIL and "loopback" in loopback.detail
    no_route = check_wake_on_lan(host, None)
    assert no_route.status is Status.FAIL and "--interface" in no_route.fix


# --- sleep states and permission ---------------------------------------------------------------

@pytest.mark.parametrize(("text", "status"), [
    ("freeze mem disk\n", Status.OK), ("freeze\n", Status.WARN), ("\n", Status.FAIL),
    (None, Status.FAIL)])
def test_suspend_states(host: TreeHost, text: str | None, status: Status) -> None:
    if text is not None:
        host.file("/sys/power/state", text)
    result = check_suspend_states(host)
    assert result.status is status, result
    if status is Status.FAIL:
        assert "power.enabled = false" in result.fix


@pytest.mark.parametrize(("text", "status", "fix"), [
    ("s2idle [deep]\n", Status.OK, ""),
    ("[s2idle] deep\n", Status.WARN, "echo deep > /sys/power/mem_sleep"),
    ("[s2idle]\n", Status.WARN, "mem_sleep_default=deep"),
])
def test_mem_sleep_deep_is_ok_and_s2idle_warns_with_the_fix(host: TreeHost, text: str,
                                                            status: Status, fix: str) -> None:
    result = check_mem_sleep(host.file("/sys/power/mem_sleep", text))
    assert result.status is status, result
    assert fix in result.fix
    if text.strip() == "[s2idle]":
        assert "S3" in result.fix
    assert check_mem_sleep(TreeHost(host.root / "empty")).status is Status.SKIP


@pytest.mark.parametrize(("answer", "uid", "status", "fix"), [
    ("yes", 1000, Status.OK, ""),
    ("challenge", 1000, Status.FAIL, "org.freedesktop.login1.suspend"),
    ("no", 1000, Status.FAIL, "polkit"),
    ("na", 0, Status.FAIL, "suspend check"),
])
def test_suspend_permission_asks_logind_without_suspending(host: TreeHost, answer: str, uid: int,
                                                           status: Status, fix: str) -> None:
    calls = host.root / "busctl-calls"
    host.program("busctl", f'echo "$@" >> {calls}; echo \'s "{answer}"\'')
    host.uid = uid
    result = check_suspend_permission(host)
    assert result.status is status, result
    assert fix in result.fix
    assert calls.read_text().split() == ["call", "org.freedesktop.login1", "/org/freedesktop/login1",
                                         "org.freedesktop.login1.Manager", "CanSuspend"]


def test_without_logind_root_warns_and_others_fail(host: TreeHost) -> None:
    host.program("busctl", "echo 'Failed to connect to bus: No such file or directory' >&2; exit 1")
    root = check_suspend_permission(host)
    assert root.status is Status.WARN and "Failed to connect to bus" in root.detail
    host.uid = 1000
    assert check_suspend_permission(host).status is Status.FAIL
    (host.root / "bin" / "busctl").unlink()
    assert "busctl is not installed" in check_suspend_permission(host).detail


def test_sleep_hook_installed_or_not(host: TreeHost) -> None:
    missing = check_sleep_hook(host)
    assert missing.status is Status.WARN and "deploy/system-sleep/llamanap" in missing.fix
    host.file("/usr/lib/systemd/system-sleep/llamanap", "#!/bin/sh\n")
    assert check_sleep_hook(host).status is Status.OK


# --- NVIDIA ------------------------------------------------------------------------------------

def nvidia_driver(host: TreeHost, preserve: str = "1") -> TreeHost:
    host.file("/proc/driver/nvidia/version", "NVRM version: NVIDIA UNIX x86_64 Kernel Module 550.0\n")
    return host.file("/proc/driver/nvidia/params",
                     f"ResmanDebugLevel: 4294967295\nPreserveVideoMemoryAllocations: {preserve}\n"
                     "TemporaryFilePath: \"/var/tmp\"\n")


def units(host: TreeHost, **states: str) -> TreeHost:
    """systemctl is-enabled answering ``states`` (unit stem -> state); others "not-found"."""
    cases = "".join(f"  {unit}.service) echo {state};;\n" for unit, state in states.items())
    return host.program("systemctl", f'case "$2" in\n{cases}  *) echo "Failed to get unit file '
                        f'state for $2: No such file or directory" >&2; exit 1;;\nesac')


def test_nvidia_checks_skip_without_the_driver(host: TreeHost) -> None:
    for result in (check_nvidia_services(host), check_preserve_vram(host), check_nvapi(host)):
        assert result.status is Status.SKIP and "CPU-only" in result.detail


def test_nvidia_suspend_services_enabled_missing_and_optional(host: TreeHost) -> None:
    nvidia_driver(host)
    units(host, **{"nvidia-suspend": "enabled", "nvidia-resume": "enabled",
                   "nvidia-hibernate": "enabled"})
    assert check_nvidia_services(host).status is Status.OK
    units(host, **{"nvidia-suspend": "enabled", "nvidia-resume": "disabled"})
    broken = check_nvidia_services(host)
    assert broken.status is Status.FAIL
    assert "nvidia-resume disabled" in broken.detail and "nvidia-hibernate not installed" in broken.detail
    assert broken.fix.startswith("`systemctl enable nvidia-resume.service nvidia-hibernate.service`")
    units(host, **{"nvidia-suspend": "enabled", "nvidia-resume": "enabled",
                   "nvidia-hibernate": "disabled"})
    assert check_nvidia_services(host).status is Status.WARN


@pytest.mark.parametrize(("value", "status"), [("1", Status.OK), ("0", Status.WARN)])
def test_preserve_video_memory_parameter(host: TreeHost, value: str, status: Status) -> None:
    result = check_preserve_vram(nvidia_driver(host, preserve=value))
    assert result.status is status
    if status is Status.WARN:
        assert "NVreg_PreserveVideoMemoryAllocations=1" in result.fix


def test_libnvidia_api_loads_or_warns_that_pstates_will_not_switch(host: TreeHost) -> None:
    nvidia_driver(host)
    assert check_nvapi(host).status is Status.WARN
    host.libraries["libnvidia-api.so.1"] = None
    assert check_nvapi(host).status is Status.OK


def test_real_library_loading_reports_instead_of_raising() -> None:
    real = RealHost()
    assert real.load_library("libc.so.6") is None
    problem = real.load_library("libllamanap-does-not-exist.so.1")
    assert problem is not None and "libllamanap-does-not-exist.so.1" in problem


class ClocklessNvml:
    """An inventory whose GPU does not list its memory clocks (old drivers)."""

    problem = None

    def snapshot(self) -> list[GpuInfo]:
        return [GpuInfo(index=0, uuid="GPU-0", pci_bus_id="0000:01:00.0", name="Tesla K80")]

    def performance_state(self, uuid: str) -> int | None:
        return None


def test_pstate_support_per_gpu(host: TreeHost) -> None:
    rig = FakeRig([FakeGpu("GPU-a", "0000:01:00.0", memory_clocks=4, pstate=8),
                   FakeGpu("GPU-b", "0000:02:00.0", name="Tesla P100", memory_clocks=1)])
    first, second = check_gpu_pstates(host, FakeNvml(rig))
    assert (first.name, first.status) == ("gpu0-pstates", Status.OK)
    assert "4 memory clocks, P8 now" in first.detail
    assert (second.name, second.status) == ("gpu1-pstates", Status.SKIP)
    assert "Tesla P100" in second.detail and "no P-states" in second.detail
    (old,) = check_gpu_pstates(host, ClocklessNvml())
    assert old.status is Status.WARN


def test_no_nvml_is_cpu_only_unless_the_driver_is_loaded(host: TreeHost) -> None:
    (cpu,) = check_gpu_pstates(host, NoGpus("libnvidia-ml.so.1 not found"))
    assert cpu.status is Status.SKIP and cpu.detail.startswith("CPU-only")
    (broken,) = check_gpu_pstates(nvidia_driver(host), NoGpus("the NVIDIA kernel driver is not loaded"))
    assert broken.status is Status.FAIL and "nvidia-smi" in broken.fix


# --- llama-server and the proxy ----------------------------------------------------------------

def node_config(tmp_path: Path, text: str) -> NodeAgentConfig:
    path = tmp_path / "node-agent.toml"
    path.write_text(text)
    return load_node_config(path)


def test_llama_server_found_with_its_version(llama_server_bin: Path) -> None:
    (result,) = check_llama_server(None)
    assert result.status is Status.OK, result
    assert "version" in result.detail


def test_llama_server_missing_and_instance_programs(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMA_SERVER", str(tmp_path / "nowhere" / "llama-server"))
    cfg = node_config(tmp_path, f"""
[instances.a]
binary = "{tmp_path}/missing-llama-server"
model = "/models/a.gguf"
port = 8081
[instances.b]
command = ["{sys.executable}", "-m", "http.server", "8082"]
port = 8082
""")
    default, a, b = check_llama_server(cfg)
    assert default.status is Status.FAIL and "LLAMA_SERVER" in default.fix
    assert (a.name, a.status) == ("instance a", Status.FAIL)
    assert "instances.a.binary" in a.detail
    assert (b.name, b.status) == ("instance b", Status.OK)


def test_proxy_skipped_without_config_or_section(tmp_path: Path, host: TreeHost) -> None:
    (none,) = check_proxy(None, host, None)
    assert none.status is Status.SKIP
    (no_section,) = check_proxy(node_config(tmp_path, ""), host, None)
    assert no_section.status is Status.SKIP


async def test_proxy_reached_with_the_token_wrong_token_unknown_node_and_down(
        tmp_path: Path, host: TreeHost) -> None:
    def agent(url: str, token: str, node: str = "box") -> NodeAgentConfig:
        return node_config(tmp_path, f'[agent]\nnode = "{node}"\n[proxy]\nurl = "{url}"\n'
                           f'token = "{token}"\ntimeout_s = 10\n')

    async def check(cfg: NodeAgentConfig) -> list[CheckResult]:
        return await trio.to_thread.run_sync(check_proxy, cfg, host, "eno1")

    nic(host).file("/sys/class/net/eno1/address", MAC + "\n")  # the MAC the proxy wakes
    nic(host, "eno2").file("/sys/class/net/eno2/address", "aa:bb:cc:dd:ee:02\n")
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            packets = await PacketListener.open()  # the proxy's node sleeps: its packets land here
            nursery.start_soon(packets.run)
            cfg = load_config(tmp_path, free_port(), packets.port)  # token "s3cret", node "box"
            proxy: Proxy = await nursery.start(serve_proxy, cfg)
            url = proxy.control_url

            good, mac = await check(agent(url, "s3cret"))
            assert good.status is Status.OK, good
            assert "knows node 'box'" in good.detail
            assert mac.status is Status.OK and mac.detail.endswith("the MAC of eno1")
            (wrong,) = await check(agent(url, "guess"))
            assert wrong.status is Status.FAIL and "401" in wrong.detail
            assert "token is wrong" in wrong.detail and "token_file" in wrong.fix
            (stranger,) = await check(agent(url, "s3cret", "other"))
            assert stranger.status is Status.WARN and "nodes: box" in stranger.detail
            nursery.cancel_scope.cancel()
    (down,) = check_proxy(agent(f"http://127.0.0.1:{free_port()}", "s3cret"), host, None)
    assert down.status is Status.FAIL and "ConnectError" in down.detail


def test_the_mac_the_proxy_wakes_must_be_a_nic_of_this_box(host: TreeHost) -> None:
    nic(host).file("/sys/class/net/eno1/address", "aa:bb:cc:dd:ee:01\n")
    nic(host, "eno2").file("/sys/class/net/eno2/address", "aa:bb:cc:dd:ee:02\n")
    assert check_wake_mac(host, "eno1", "box", "AA-BB-CC-DD-EE-01").status is Status.OK
    other = check_wake_mac(host, "eno1", "box", "aa:bb:cc:dd:ee:02")
    assert other.status is Status.WARN and other.fix == "run `node-agent doctor --interface eno2`"
    wrong = check_wake_mac(host, "eno1", "box", "aa:bb:cc:dd:ee:99")
    assert wrong.status is Status.FAIL
    assert wrong.fix == "set nodes.box.mac in the proxy's config to eno1 (aa:bb:cc:dd:ee:01)"


# --- the whole command -------------------------------------------------------------------------

def healthy_box(host: TreeHost) -> TreeHost:
    nic(host).program("ethtool", f"printf '{ETHTOOL_MAGIC_ON}'")
    host.file("/proc/net/route", ROUTE_HEADER + "eno1\t00000000\t0102A8C0\t0003\t0\t0\t0\t"
              "00000000\t0\t0\t0\n")
    host.file("/sys/power/state", "freeze mem disk\n").file("/sys/power/mem_sleep", "s2idle [deep]\n")
    host.program("busctl", "echo 's \"yes\"'")
    host.file("/usr/lib/systemd/system-sleep/llamanap", "#!/bin/sh\n")
    units(nvidia_driver(host), **{"nvidia-suspend": "enabled", "nvidia-resume": "enabled",
                                  "nvidia-hibernate": "enabled"})
    host.libraries["libnvidia-api.so.1"] = None
    return host


def test_a_healthy_gpu_box_passes_every_check(host: TreeHost, llama_server_bin: Path) -> None:
    rig = FakeRig([FakeGpu("GPU-a", "0000:01:00.0", memory_clocks=4)])
    results = run_checks(healthy_box(host), None, interface=None, inventory=FakeNvml(rig))
    bad = [r for r in results if r.status not in (Status.OK, Status.SKIP)]
    assert bad == []
    assert [r.name for r in results if r.status is Status.SKIP] == ["proxy"]


def test_power_and_pstates_disabled_in_config_turn_their_checks_into_skips(
        host: TreeHost, tmp_path: Path) -> None:
    cfg = node_config(tmp_path, "[power]\nenabled = false\n[pstate]\nenabled = false\n")
    nvidia_driver(host)  # and nothing else: no NIC, no sleep states, no units, no NVAPI
    results = {r.name: r for r in run_checks(host, cfg, interface=None, inventory=NoGpus("x"))}
    for name in ("wake-on-lan", "suspend", "mem-sleep", "suspend-permission", "sleep-hook",
                 "nvidia-suspend", "nvidia-preserve-vram", "libnvidia-api"):
        assert results[name].status is Status.SKIP, results[name]
    assert results["suspend"].detail.startswith("power.enabled = false: this box never suspends (fail:")
    assert results["libnvidia-api"].detail.startswith("pstate.enabled = false (warn:")


def test_table_shows_a_fix_line_under_each_failure_and_json_has_every_field() -> None:
    results = [CheckResult("suspend", Status.FAIL, "no sleep state", "set power.enabled = false"),
               CheckResult("mem-sleep", Status.OK, "deep")]
    table = render_table(results).splitlines()
    assert table[0].split()[:2] == ["FAIL", "suspend"]
    assert table[1].strip() == "fix: set power.enabled = false"
    assert table[2].split()[:2] == ["ok", "mem-sleep"]
    assert table[-1] == "1 failed, 1 ok"
    data = json.loads(render_json(results))
    assert data["ok"] is False
    assert data["checks"][0] == {"name": "suspend", "status": "fail", "detail": "no sleep state",
                                 "fix": "set power.enabled = false"}


def node_agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "inference_node", *args], capture_output=True,
                          text=True, timeout=SUBPROCESS_TIMEOUT_S, cwd=REPO)


def test_doctor_on_this_machine_reports_cpu_only_and_exits_by_its_failures(
        tmp_path: Path, llama_server_bin: Path) -> None:
    """This machine has no GPU and no NVIDIA driver: the GPU checks say CPU-only and skip."""
    config = tmp_path / "node-agent.toml"
    config.write_text(f'[proxy]\nurl = "http://127.0.0.1:{free_port()}"\n')
    out = node_agent("doctor", "--config", str(config), "--json")
    assert "Traceback" not in out.stderr
    data = json.loads(out.stdout)
    checks = {c["name"]: c for c in data["checks"]}
    assert checks["gpu-pstates"]["status"] == "skip"
    assert checks["gpu-pstates"]["detail"].startswith("CPU-only")
    assert checks["llama-server"]["status"] == "ok"
    assert checks["proxy"]["status"] == "fail"  # nothing listens there
    assert {"wake-on-lan", "suspend", "mem-sleep", "suspend-permission", "sleep-hook",
            "nvidia-suspend", "libnvidia-api"} <= set(checks)
    assert out.returncode == 1 and data["ok"] is False
    for check in data["checks"]:
        assert check["status"] in ("ok", "warn", "fail", "skip")
        if check["status"] == "fail":
            assert check["fix"], check
    table = node_agent("doctor", "--config", str(config))
    assert table.returncode == 1
    assert "fix: " in table.stdout and "CPU-only" in table.stdout
