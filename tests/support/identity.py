"""What makes a guest a distinct machine, read from the guest, the SSH client and QEMU:
for tests that compare clones (tests/integration/test_identity.py)."""

from __future__ import annotations

import base64
import hashlib
import re
import time
from dataclasses import dataclass
from typing import Any

# The DHCP client's lease as networkd holds it (CLIENTID: ff, IAID, DUID).
LEASE = "cat /run/systemd/netif/leases/*"
DROPIN = "/etc/systemd/network/10-dhcp.network.d/50-pytest-kvm-clone.conf"


@dataclass(frozen=True)
class Identity:
    mac: str  # the guest's NIC with guest.mac, as the guest sees it
    dev: str
    machine_id: str
    host_key_guest: str  # SHA256 fingerprint of the guest's host key file
    host_key_client: str  # ... of the key the SSH client was offered
    client_id: str  # the DHCP client identifier networkd's lease was got with
    # The IAID networkd takes at its next start (on user networking: the next boot;
    # the DUID follows the machine-id then too), as in the CLIENTID (8 hex digits).
    iaid: str
    hostname: str


def fingerprint(key: Any) -> str:
    """An SSH key's SHA256 fingerprint as ssh-keygen -l prints it."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


def link_local(mac: str) -> str:
    """The IPv6 link-local address the kernel makes from ``mac`` (EUI-64)."""
    o = [int(x, 16) for x in mac.split(":")]
    o[0] ^= 0x02
    words = [o[0] << 8 | o[1], o[2] << 8 | 0xFF, 0xFE << 8 | o[3], o[4] << 8 | o[5]]
    return "fe80::" + ":".join(f"{w:x}" for w in words)


def primary_dev(guest: Any) -> str:
    return guest.succeed(f"grep -l {guest.mac} /sys/class/net/*/address | cut -d/ -f5").strip()


def read_identity(guest: Any, timeout: float = 180, dhcp_running: bool = False) -> Identity:
    """``dhcp_running``: networkd runs with the clone's identity already (after a
    reboot): wait until its lease was got with the clone's IAID. Without, on user
    networking networkd keeps the template's DUID until its next start, and the
    lease is the template's."""
    dev = primary_dev(guest)
    link = guest.succeed(f"ip -o link show dev {dev}")
    mac = re.search(r"link/ether (\S+)", link)
    assert mac, link
    # Written in the background of the clone's start: wait for it.
    guest.wait_until_succeeds(f"grep -q '^IAID=' {DROPIN}", timeout=timeout)
    iaid = int(guest.succeed(f"sed -n 's/^IAID=//p' {DROPIN}").strip())
    if dhcp_running:
        guest.wait_until_succeeds(f"{LEASE} | grep -q '^CLIENTID=ff{iaid:08x}'", timeout=timeout)
    lease = guest.succeed(LEASE)
    client_id = re.search(r"^CLIENTID=(\S+)", lease, re.M)
    assert client_id, lease
    guest_key = guest.succeed("ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub").split()[1]
    offered = guest.ssh.get_transport().get_remote_server_key()
    return Identity(
        mac=mac.group(1),
        dev=dev,
        machine_id=guest.succeed("cat /etc/machine-id").strip(),
        host_key_guest=guest_key,
        host_key_client=fingerprint(offered),
        client_id=client_id.group(1),
        iaid=f"{iaid:08x}",
        hostname=guest.succeed("hostname").strip(),
    )


def qemu_macs(guest: Any) -> list[str]:
    """The MACs of the guest's NICs as QEMU's monitor reports them (the host side)."""
    table = str(guest.machine.qmp("human-monitor-command", **{"command-line": "info network"}))
    return re.findall(r"macaddr=([0-9a-f:]{17})", table)


def assert_distinct(guests: list[Any], idents: list[Identity]) -> None:
    """Every part of each guest's identity is its own, and agrees with itself."""
    n = len(guests)
    for guest, ident in zip(guests, idents, strict=True):
        assert ident.mac == guest.mac
        assert guest.mac in qemu_macs(guest)
        assert ident.host_key_guest == ident.host_key_client
        assert ident.hostname == guest.name[:63]
    for guest, ident in zip(guests, idents, strict=True):
        # The IPv6 link-local address follows the MAC; none from the template's stays.
        guest.wait_until_succeeds(
            f"ip -6 -o address show dev {ident.dev} | grep -qF {link_local(guest.mac)}/64",
            timeout=60,
        )
        if guest.template is not None:
            assert link_local(guest.template.mac) not in guest.succeed("ip -6 -o address show")
    for field in ("mac", "machine_id", "host_key_guest", "hostname", "iaid"):
        values = {getattr(ident, field) for ident in idents}
        assert len(values) == n, (field, values)
    if guests and guests[0].template is not None:
        template = guests[0].template
        assert all(ident.mac != template.mac for ident in idents)
        assert all(
            ident.host_key_client != fingerprint(template.host_key.public_key()) for ident in idents
        )


# How far behind the host a clone's clock may be: the host time it was given was
# taken before the guest ran `date -s` (a guest-exec and a shell under TCG; seconds
# on a loaded host). The template's own clock is minutes to days behind.
CLOCK_SET_SLACK = 5.0


def assert_clock_is_hosts(guest: Any) -> None:
    """The guest's wall clock is the host's (set when the clone was made), read
    between two host readings so that the read's own latency is not counted."""
    before = time.time()
    seen = float(guest.succeed("date +%s.%N"))
    after = time.time()
    assert before - CLOCK_SET_SLACK <= seen <= after + 0.5, (before, seen, after)
