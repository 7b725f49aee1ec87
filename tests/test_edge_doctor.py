"""``edge-proxy doctor`` with real sockets, real TOML and the real command line, on loopback and
in a network namespace the test builds (never on the machine's own LAN).

Nodes point at 127.0.0.1: a listening backend (connected), a closed port (refused) and a
backend whose accept queue is full, which drops the SYN like a sleeping host (timed out).
Magic-packet paths go to 127.0.0.1 too, and a UDP listener there proves the doctor sends none.
Where a LAN is needed (directed broadcasts), the pure classifier gets addresses from the
documentation ranges (RFC 5737) as data; nothing is sent to them.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from edge_proxy.doctor import (
    LIMITED_BROADCAST,
    LocalAddress,
    _classify,
    check_reach,
    check_wol_path,
    local_addresses,
    run_checks,
)
from shared.config.edge import NodeConfig, WolConfig, load_edge_config
from shared.doctor import Status
from tests.support.edge import MAC, TEST_TIMEOUT_S, PacketListener, free_port, serve_backend
from tests.support.ports import LOOPBACK

REPO = Path(__file__).resolve().parent.parent
# Short, because the timed-out case waits it out; a full accept queue never answers anyway.
REACH_TIMEOUT_S = 0.5
NOT_MINE = "192.0.2.1"  # TEST-NET-1: never assigned here; bind() to it fails before sending

LAN = ipaddress.IPv4Network("192.0.2.0/24")
OTHER_LAN = ipaddress.IPv4Network("198.51.100.0/24")
LOCAL = [LocalAddress("eno1", ipaddress.IPv4Address("192.0.2.10"), LAN),
         LocalAddress("eno2", ipaddress.IPv4Address("198.51.100.10"), OTHER_LAN)]


def node(broadcast: str = LOOPBACK, source: str | None = None, port: int = 9) -> NodeConfig:
    return NodeConfig(host=LOOPBACK, mac=MAC, wol=WolConfig(broadcast=broadcast, port=port,
                                                            source=source))


async def idle(stream: trio.SocketStream) -> None:
    await stream.aclose()


async def http_backend(status: int, stream: trio.SocketStream) -> None:
    await stream.receive_some(4096)
    await stream.send_all(f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n".encode())
    await stream.aclose()


@contextmanager
def full_accept_queue() -> Iterator[int]:
    """A port whose accept queue is full: the kernel drops new SYNs, as a sleeping host would."""
    with socket.socket() as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        with socket.create_connection((LOOPBACK, port), timeout=TEST_TIMEOUT_S):
            yield port


# --- the Wake-on-LAN path ----------------------------------------------------------------------

def test_wol_path_to_loopback_names_the_interface() -> None:
    result = check_wol_path("box", node(), local_addresses())
    assert result.status is Status.OK, result
    assert result.name == "wol box"
    assert "from 127.0.0.1 (lo)" in result.detail


def test_wol_source_must_be_an_address_of_this_machine() -> None:
    assert check_wol_path("box", node(source=LOOPBACK), local_addresses()).status is Status.OK
    result = check_wol_path("box", node(source=NOT_MINE), local_addresses())
    assert result.status is Status.FAIL
    assert "nodes.box.wol.source" in result.detail and NOT_MINE in result.detail
    assert "127.0.0.1 (lo)" in result.fix


def test_wol_broadcast_must_be_an_address() -> None:
    result = check_wol_path("box", node(broadcast="gpubox-lan"), local_addresses())
    assert result.status is Status.FAIL
    assert result.detail == "nodes.box.wol.broadcast = 'gpubox-lan' is not an IP address"


@pytest.mark.parametrize(("target", "source", "status", "words"), [
    ("192.0.2.255", "192.0.2.10", Status.OK, "directed broadcast of eno1's LAN 192.0.2.0/24"),
    ("198.51.100.255", "192.0.2.10", Status.WARN, 'source = "198.51.100.10"'),
    ("192.0.2.77", "192.0.2.10", Status.WARN, 'broadcast = "192.0.2.255"'),
    ("203.0.113.255", "192.0.2.10", Status.WARN, "routers drop directed broadcasts"),
])
def test_broadcast_address_is_compared_with_the_lans_of_this_box(
        target: str, source: str, status: Status, words: str) -> None:
    result = _classify("wol box", "nodes.box.wol", ipaddress.ip_address(target),
                       ipaddress.ip_address(source), LOCAL)
    assert result.status is status, result
    assert words in result.detail + result.fix


def test_limited_broadcast_is_ok_and_says_which_nic_it_leaves() -> None:
    result = _classify("wol box", "nodes.box.wol", LIMITED_BROADCAST,
                       ipaddress.ip_address("192.0.2.10"), LOCAL)
    assert result.status is Status.OK
    assert "from 192.0.2.10 (eno1)" in result.detail and "wol.source" in result.detail


# --- reaching the backends ---------------------------------------------------------------------

async def test_reach_connected_refused_and_timed_out(nursery: trio.Nursery) -> None:
    up = free_port()
    await nursery.start(serve_backend, up, idle)
    connected = await check_reach("box", node(), up, None, REACH_TIMEOUT_S)
    assert connected.status is Status.OK and connected.detail == f"127.0.0.1:{up}: connected"

    refused = await check_reach("box", node(), free_port(), None, REACH_TIMEOUT_S)
    assert refused.status is Status.WARN and "refused: the host is up" in refused.detail

    with full_accept_queue() as port:
        asleep = await check_reach("box", node(), port, None, REACH_TIMEOUT_S)
    assert asleep.status is Status.WARN and "asleep, or gone" in asleep.detail


async def test_reach_reports_http_readiness(nursery: trio.Nursery) -> None:
    loading, ready = free_port(), free_port()
    await nursery.start(serve_backend, loading, lambda s: http_backend(503, s))
    await nursery.start(serve_backend, ready, lambda s: http_backend(200, s))
    not_yet = await check_reach("box", node(), loading, "/health", TEST_TIMEOUT_S)
    assert not_yet.status is Status.OK and "not ready yet (GET /health answered 503)" in not_yet.detail
    done = await check_reach("box", node(), ready, "/health", TEST_TIMEOUT_S)
    assert done.status is Status.OK and "ready (GET /health answered 200)" in done.detail

    silent = free_port()
    await nursery.start(serve_backend, silent, lambda s: trio.sleep_forever())
    mute = await check_reach("box", node(), silent, "/health", REACH_TIMEOUT_S)
    assert mute.status is Status.OK
    assert mute.detail.endswith("connected, no answer to GET /health within 0.5 s")


def write_config(tmp_path: Path, up: int, down: int, wol_port: int, source: str = LOOPBACK,
                 ready: str = "http:/health") -> Path:
    path = tmp_path / "edge.toml"
    path.write_text(f"""
[nodes.up]
host = "127.0.0.1"
mac = "{MAC}"
wol = {{ broadcast = "127.0.0.1", port = {wol_port}, source = "{source}" }}
[nodes.down]
host = "127.0.0.1"
mac = "{MAC}"
wol = {{ broadcast = "127.0.0.1", port = {wol_port} }}
[[routes]]
listen = "127.0.0.1:0"
node = "up"
backend_port = {up}
[[routes]]
listen = "127.0.0.1:0"
node = "up"
backend_port = {up}
ready = "{ready}"
[[routes]]
listen = "127.0.0.1:0"
node = "down"
backend_port = {down}
""")
    return path


async def test_whole_run_checks_every_node_and_backend_and_sends_no_packet(
        tmp_path: Path, nursery: trio.Nursery) -> None:
    packets = await PacketListener.open()
    nursery.start_soon(packets.run)
    up = free_port()
    await nursery.start(serve_backend, up, lambda s: http_backend(200, s))
    cfg = load_edge_config(write_config(tmp_path, up, free_port(), packets.port))
    with trio.fail_after(TEST_TIMEOUT_S):
        results = await run_checks(cfg, timeout_s=REACH_TIMEOUT_S)
    assert [(r.name, r.status) for r in results] == [
        ("wol down", Status.OK), ("wol up", Status.OK),
        (f"reach down:{cfg.routes[2].backend_port}", Status.WARN),
        (f"reach up:{up}", Status.OK),  # one connect for both routes to this backend
    ]
    assert "ready (GET /health answered 200)" in results[3].detail
    await trio.sleep(0.2)  # anything sent to the listener on loopback would have arrived by now
    assert packets.packets == []


def edge_proxy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_proxy", *args], capture_output=True,
                          text=True, timeout=TEST_TIMEOUT_S * 2, cwd=REPO)


def test_command_line_exit_code_and_json(tmp_path: Path) -> None:
    with socket.socket() as backend:
        backend.bind((LOOPBACK, 0))
        backend.listen(8)
        up = backend.getsockname()[1]
        good = write_config(tmp_path, up, free_port(), free_port(), ready="tcp")
        out = edge_proxy("doctor", "-c", str(good), "--json")
        assert out.returncode == 0, out.stdout + out.stderr
        data = json.loads(out.stdout)
        statuses = {c["name"]: c["status"] for c in data["checks"]}
        assert statuses == {"wol down": "ok", "wol up": "ok", f"reach up:{up}": "ok",
                            next(n for n in statuses if n.startswith("reach down")): "warn"}

        bad = write_config(tmp_path, up, free_port(), free_port(), source=NOT_MINE, ready="tcp")
        out = edge_proxy("doctor", "-c", str(bad))
        assert out.returncode == 1
        assert "FAIL  wol up" in out.stdout and "fix: use one of:" in out.stdout


# --- a real LAN interface, in a network namespace of the test's own ----------------------------

NETNS_LAN = "10.77.0.0/24"  # exists only inside the namespace below
NETNS_SELF, NETNS_BROADCAST, NETNS_SLEEPER = "10.77.0.1", "10.77.0.255", "10.77.0.5"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=TEST_TIMEOUT_S)


@pytest.fixture
def lan_namespace() -> Iterator[str]:
    """A namespace with a veth pair: this box is NETNS_SELF on one end, the other end is up and
    silent, so a connect to NETNS_SLEEPER gets no ARP answer and times out like a sleeping host."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to build a network namespace")
    name = f"llamanap-doctor-{os.getpid()}"
    _ip("netns", "add", name)
    try:
        _ip("-n", name, "link", "add", "lan0", "type", "veth", "peer", "name", "lan1")
        _ip("-n", name, "addr", "add", f"{NETNS_SELF}/24", "brd", "+", "dev", "lan0")
        for link in ("lo", "lan0", "lan1"):
            _ip("-n", name, "link", "set", link, "up")
        yield name
    finally:
        _ip("netns", "del", name)


@pytest.mark.netns
def test_directed_broadcast_and_a_sleeping_node_on_a_real_interface(
        tmp_path: Path, lan_namespace: str) -> None:
    config = tmp_path / "edge.toml"
    config.write_text(f"""
[nodes.box]
host = "{NETNS_SLEEPER}"
mac = "{MAC}"
wol = {{ broadcast = "{NETNS_BROADCAST}", source = "{NETNS_SELF}" }}
[nodes.unicast]
host = "{NETNS_SLEEPER}"
mac = "{MAC}"
wol = {{ broadcast = "{NETNS_SLEEPER}" }}
[[routes]]
listen = "127.0.0.1:0"
node = "box"
backend_port = 8080
""")
    out = subprocess.run(["ip", "netns", "exec", lan_namespace, sys.executable, "-m", "edge_proxy",
                          "doctor", "-c", str(config), "--json"], capture_output=True, text=True,
                         timeout=TEST_TIMEOUT_S * 2, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    checks = {c["name"]: c for c in json.loads(out.stdout)["checks"]}
    box, unicast, reach = checks["wol box"], checks["wol unicast"], checks["reach box:8080"]
    assert box["status"] == "ok"
    assert box["detail"] == (f"directed broadcast of lan0's LAN {NETNS_LAN}, "
                             f"sent from {NETNS_SELF} (lan0)")
    assert unicast["status"] == "warn"
    assert unicast["fix"] == f'set nodes.unicast.wol.broadcast = "{NETNS_BROADCAST}"'
    assert reach["status"] == "warn" and "asleep, or gone" in reach["detail"]
