"""Networks with real guests: user forwards, kvm_vlan segments, and bridges with DHCP.

Bridge tests build their bridge and DHCP server (dnsmasq) inside a network namespace
(tests/integration/support/netns.py) and run an inner pytest there, so nothing touches the
host's own interfaces.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_kvm.errors import KvmConfigError
from pytest_kvm.network import MAC_DIR
from tests.integration.support.netns import BRIDGE, BridgeNetns, namespaces
from tests.support.processes import qemu_pids_under

# Fetch a URL inside the guest (python3 comes with cloud-init).
FETCH = "python3 -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())' "  # noqa: E501


def _listening_addresses(port: int) -> set[str]:
    """Local addresses of host TCP sockets listening on ``port`` (from /proc/net/tcp)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state = fields[1], fields[3]
            host, _, hexport = local.rpartition(":")
            if state == "0A" and int(hexport, 16) == port:
                found.add(host)
    return found


def test_forward_port_reaches_a_guest_service_on_loopback_only(kvm_guest):
    kvm_guest.succeed(
        "mkdir -p /srv/www && echo hello-from-guest >/srv/www/index.html && "
        "(cd /srv/www && nohup python3 -m http.server 8080 >/dev/null 2>&1 &)"
    )
    kvm_guest.wait_for_port(8080)
    port = kvm_guest.forward_port(8080)
    assert kvm_guest.forwarded_ports[8080] == port
    assert kvm_guest.forwarded_ports[22] == kvm_guest.ssh_port
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(b"GET /index.html HTTP/1.0\r\n\r\n")
        reply = b""
        while chunk := conn.recv(4096):
            reply += chunk
    assert b"hello-from-guest" in reply
    # Bound to 127.0.0.1 (0100007F in /proc/net/tcp), nowhere else.
    assert _listening_addresses(port) == {"0100007F"}
    assert _listening_addresses(kvm_guest.ssh_port) == {"0100007F"}


def test_guest_reaches_the_host_at_its_host_address(kvm_guest):
    received: list[bytes] = []
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(60)
        port = server.getsockname()[1]

        def serve() -> None:
            conn, _ = server.accept()
            with conn:
                request = b""
                while b"\r\n\r\n" not in request:  # all of it: unread data means a RST
                    request += conn.recv(4096)
                received.append(request)
                conn.sendall(b"HTTP/1.0 200 OK\r\n\r\nhello-from-host")

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        assert kvm_guest.host_address == "10.0.2.2"
        out = kvm_guest.succeed(FETCH + f"http://{kvm_guest.host_address}:{port}/ping")
        thread.join(30)
    assert out.strip() == "hello-from-host"
    assert received and received[0].startswith(b"GET /ping")


def test_forward_to_a_host_port_in_use_is_a_clear_error(kvm_guest):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        with pytest.raises(KvmConfigError, match=f"127.0.0.1:{port} is already in use"):
            kvm_guest.forward_port(80, host_port=port)
    with pytest.raises(KvmConfigError, match="not a TCP port number"):
        kvm_guest.forward_port(70000)
    # The guest and its SSH are unaffected.
    assert kvm_guest.succeed("echo ok").strip() == "ok"


def _serve_tcp(guest, port: int) -> None:
    guest.succeed(
        f"nohup python3 -m http.server {port} --directory /etc >/dev/null 2>&1 &", timeout=30
    )
    guest.wait_for_port(port)


def test_two_guests_on_a_vlan_talk_and_stop_when_a_link_is_down(kvm_guest_factory, kvm_vlan):
    a = kvm_guest_factory(vlan=kvm_vlan)
    b = kvm_guest_factory(network=kvm_vlan)  # what users try first: the same as vlan=
    assert b.vlan_macs and b.address == "127.0.0.1"  # SSH stays on the user network
    addr_a, addr_b = kvm_vlan.address_of(a), kvm_vlan.address_of(b)
    assert addr_a != addr_b
    assert a.vlan_macs[0] != b.vlan_macs[0]
    # Each guest has its static address on the NIC with its own MAC.
    for guest, addr in ((a, addr_a), (b, addr_b)):
        dev = guest.succeed(
            f"grep -l {guest.vlan_macs[0]} /sys/class/net/*/address | cut -d/ -f5"
        ).strip()
        assert f"{addr}/24" in guest.succeed(f"ip -4 -o address show dev {dev}")
    _serve_tcp(b, 8000)
    url = f"http://{addr_b}:8000/hostname"
    assert a.succeed(FETCH + url).strip() == b.succeed("cat /etc/hostname").strip()

    b.set_link(up=False)
    down = a.run(FETCH + url)
    assert down.exit_status != 0 and "timed out" in down.stderr
    # The test's own SSH to b (user network) is unaffected.
    assert b.succeed("echo still-here").strip() == "still-here"

    b.set_link(up=True)
    a.wait_until_succeeds(FETCH + url, timeout=60)
    with pytest.raises(KvmConfigError, match="pass every kvm_vlan segment as vlan="):
        kvm_guest_factory(network=kvm_vlan, vlan=kvm_vlan)


def test_vlan_is_private_to_its_guests(kvm_guest_factory, kvm_vlan):
    """A guest not on the segment does not see it; the segment's sockets are private."""
    on = kvm_guest_factory(vlan=kvm_vlan)
    off = kvm_guest_factory()
    _serve_tcp(on, 8001)
    assert off.run(FETCH + f"http://{kvm_vlan.address_of(on)}:8001/").exit_status != 0
    assert kvm_vlan.switch_path.stat().st_mode & 0o077 == 0
    assert kvm_vlan.directory.stat().st_mode & 0o077 == 0
    with pytest.raises(KvmConfigError, match="is not on vlan"):
        kvm_vlan.address_of(off)


# -- bridges, inside a network namespace ------------------------------------------------

INNER_BRIDGE = """
import base64
import concurrent.futures
import hashlib
import os
import socket

import pytest

from pytest_kvm.errors import KvmConfigError

LEASES = os.environ["PKVM_TEST_LEASES"]


# dnsmasq's lease of a MAC: its address (or another field: 4 is the client id).
def lease_for(mac, field=2):
    for line in open(LEASES):
        fields = line.split()
        if len(fields) >= 5 and fields[1].lower() == mac.lower():
            return fields[field]
    return None


def fingerprint(key):
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


# What must be the guest's own: seen by the guest, by SSH and by the DHCP server.
def identity(guest):
    host_key = guest.succeed("ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub").split()[1]
    offered = fingerprint(guest.ssh.get_transport().get_remote_server_key())
    assert host_key == offered
    return {
        "mac": guest.mac,
        "address": guest.address,
        "machine_id": guest.succeed("cat /etc/machine-id").strip(),
        "host_key": host_key,
        "hostname": guest.succeed("hostname").strip(),
        "client_id": lease_for(guest.mac, 4),
    }


# A restored guest has the memory and CPUs of its shape (the template's saved RAM).
def check_size(guest, memory_mib, cpus):
    assert guest.succeed("nproc").strip() == str(cpus)
    mem_kib = int(guest.succeed("awk '/MemTotal/ {print $2}' /proc/meminfo"))
    assert (memory_mib - 160) * 1024 < mem_kib <= memory_mib * 1024, mem_kib


def check_reachable(guest):
    try:
        _check_reachable(guest)
    except BaseException:
        print(guest.run("journalctl -b -u systemd-networkd -o short-monotonic; ip address").stdout)
        raise


def _check_reachable(guest):
    assert guest.ssh_port == 22 and guest.address.startswith("10.77.0.")
    # The guest itself holds the address, on the NIC with its MAC.
    assert guest.mac in guest.succeed("cat /sys/class/net/*/address").split()
    assert f"{guest.address}/24" in guest.succeed("ip -4 -o address show").split()
    # The DHCP server on the bridge gave it that address.
    assert lease_for(guest.mac) == guest.address
    # The test process reaches its sshd on the bridge address, not through a forward.
    with socket.create_connection((guest.address, 22), timeout=30) as conn:
        assert conn.recv(4) == b"SSH-"
    assert guest.host_address is None


@pytest.mark.kvm(network="bridge=br0")
def test_four_guests_started_at_once(kvm_guest_factory):
    # memory= and cpus= from the factory: the size of the shape test_qemu_bridge_helper
    # names in its marker, so both restore one template.
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        guests = list(pool.map(lambda _: kvm_guest_factory(memory=512, cpus=1), range(4)))
    # Restored from the one template of this bridge, not booted.
    assert all(g.template is not None and g.template == guests[0].template for g in guests)
    for guest in guests:
        assert int(guest.mac.split(":")[0], 16) & 2  # locally administered
        check_reachable(guest)
        check_size(guest, 512, 1)
    # Each a machine of its own: one lease each (with its own DHCP client id), its
    # own MAC, address, machine-id, host key and host name.
    idents = [identity(g) for g in guests]
    for key in idents[0]:
        assert len({ident[key] for ident in idents}) == 4, (key, idents)
    template = guests[0].template
    assert template.mac not in {ident["mac"] for ident in idents}
    assert lease_for(template.mac) not in {ident["address"] for ident in idents}
    # One tap per guest on the bridge, besides the veth port the suite made.
    taps = [p for p in os.listdir("/sys/class/net/br0/brif") if p != "veth0"]
    assert len(taps) == 4, taps
    # Guests reach each other across the bridge.
    a, b = guests[0], guests[1]
    a.succeed(f"timeout 20 bash -c 'exec 3<>/dev/tcp/{b.address}/22; head -c 4 <&3'")
    with pytest.raises(KvmConfigError, match="forwarding is for user networking"):
        a.forward_port(80)


# networkd restarts (its DHCP client with it) while "ip monitor" watches the addresses.
RESTART_NETWORKD = (
    "t=$(date +%s); (timeout 300 ip -4 monitor address >/tmp/addr-events 2>&1 &); sleep 1; "
    "systemctl restart systemd-networkd; i=0; "
    "until journalctl -u systemd-networkd --since=@$t -o cat | grep -q 'DHCPv4 address'; do "
    "i=$((i + 1)); if [ $i -gt 600 ]; then echo no new lease >&2; exit 1; fi; sleep 0.2; done; "
    "cat /tmp/addr-events"
)


@pytest.mark.kvm(network="bridge=br0,helper", memory=512, cpus=1)
def test_qemu_bridge_helper(kvm_guest):
    assert kvm_guest.template is not None  # the same bridge's template
    check_reachable(kvm_guest)
    check_size(kvm_guest, 512, 1)  # the marker's memory= and cpus=
    # The address a test reaches the guest at never goes away, not even for the
    # moment a restarted DHCP client takes to get the same lease again.
    events = kvm_guest.succeed(RESTART_NETWORKD, timeout=300)
    assert "Deleted" not in events, events
    check_reachable(kvm_guest)


@pytest.mark.parametrize(
    "spec, says",
    [
        ("bridge=nosuch0", "there is no network interface 'nosuch0'"),
        ("bridge=veth1", "'veth1' is not a bridge"),
        ("bridge=veth0", "'veth0' is a bridge port"),
    ],
)
def test_bad_bridge(kvm_guest_factory, spec, says):
    with pytest.raises(KvmConfigError, match=says) as info:
        kvm_guest_factory(network=spec)
    assert "\\n" not in str(info.value)
"""

INNER_NO_CAP = """
import pytest

from pytest_kvm.errors import KvmConfigError


@pytest.mark.kvm(network="bridge=br0")
def test_without_net_admin(kvm_guest_factory):
    with pytest.raises(KvmConfigError, match="needs root or CAP_NET_ADMIN") as info:
        kvm_guest_factory()
    message = str(info.value)
    assert "qemu-bridge-helper" in message and "allow br0" in message
    assert "\\n" not in message
"""


needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="bridge tests make a network namespace: run them as root"
)


@pytest.fixture
def bridge_netns(tmp_path: Path) -> Iterator[BridgeNetns]:
    if os.geteuid() != 0:
        pytest.skip("bridge tests make a network namespace: run them as root")
    ns = BridgeNetns(tmp_path / "netns")
    ns.workdir.mkdir()
    with ns:
        yield ns
    # Nothing is left: no namespace (so no bridge or tap), no dnsmasq.
    assert ns.name not in namespaces()
    assert ns.dnsmasq is None


def test_bridge_guests_get_dhcp_addresses_and_unique_macs(
    pytester, image_arg, cache_arg, inner_env, bridge_netns, monkeypatch
):
    pytester.makepyfile(test_inner=INNER_BRIDGE)
    reserved_before = set(MAC_DIR.glob("*"))
    monkeypatch.setenv("PKVM_TEST_LEASES", str(bridge_netns.leases))
    argv = bridge_netns.with_bridge_acl(
        f"allow {BRIDGE}",
        sys.executable, "-m", "pytest", str(pytester.path), f"--kvm-image={image_arg}",
        cache_arg, "-p", "no:cacheprovider", "-v", "-rA",
    )  # fmt: skip
    result = pytester.run(*argv, timeout=1800)
    result.assert_outcomes(passed=5)
    leases = bridge_netns.leases.read_text().splitlines()
    # Four at once and the helper's guest, all clones; and the template's own, when
    # this run made it (it boots once per bridge, then is cached).
    made = "making template" in result.stdout.str() + result.stderr.str()
    assert len(leases) == (6 if made else 5), leases
    assert len({line.split()[1] for line in leases}) == len(leases)  # one per MAC
    # After the run: no guest, no tap on the bridge, no qemu.
    assert bridge_netns.links("tun") == []
    assert bridge_netns.ports() == ["veth0"]
    assert set(MAC_DIR.glob("*")) == reserved_before  # every MAC reservation released
    assert not qemu_pids_under(inner_env)
    assert list(inner_env.iterdir()) == []


def test_bridge_without_net_admin_says_how_to_use_the_helper(
    pytester, image_arg, cache_arg, inner_env, bridge_netns
):
    pytester.makepyfile(test_inner=INNER_NO_CAP)
    argv = bridge_netns.exec_argv(
        "setpriv", "--bounding-set", "-net_admin", "--",
        sys.executable, "-m", "pytest", str(pytester.path), f"--kvm-image={image_arg}",
        cache_arg, "-p", "no:cacheprovider",
    )  # fmt: skip
    result = pytester.run(*argv, timeout=600)
    result.assert_outcomes(passed=1)
    assert bridge_netns.links("tun") == []


@needs_root
def test_bridge_namespace_is_gone_after_a_failing_inner_test(pytester, image_arg, tmp_path):
    """The suite's own clean-up: even when the test inside fails, the namespace,
    bridge and dnsmasq are gone afterwards."""
    ns = BridgeNetns(tmp_path / "ns")
    ns.workdir.mkdir()
    pid = None
    try:
        with ns:
            pid = ns.dnsmasq.pid if ns.dnsmasq else None
            pytester.makepyfile(test_fail="def test_fail():\n    assert False\n")
            result = pytester.run(
                *ns.exec_argv(sys.executable, "-m", "pytest", str(pytester.path), "-p",
                              "no:cacheprovider"),
                timeout=300,
            )  # fmt: skip
            result.assert_outcomes(failed=1)
            raise RuntimeError("the test fails here")
    except RuntimeError:
        pass
    assert ns.name not in namespaces()
    assert pid is not None and not Path(f"/proc/{pid}").exists()
