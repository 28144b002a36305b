"""Every restored clone is a machine of its own (issue 20): MAC, machine-id, SSH host
key, DHCP client identity and host name, on user and vlan networks (bridges: in
test_network.py, inside a network namespace); that it stays that machine after reboot:
parity_suite.py, on every backend."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import shlex
import socket
import subprocess
import threading

from pytest_kvm.guest import Guest
from tests.support.identity import (
    assert_distinct,
    fingerprint,
    primary_dev,
    qemu_macs,
    read_identity,
)


def _three(factory, **kwargs):
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        return list(pool.map(lambda _: factory(**kwargs), range(3)))


def _host_listener() -> tuple[socket.socket, int]:
    """A TCP service on the host's 127.0.0.1 that says hello to whoever connects."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"hello")

    threading.Thread(target=serve, daemon=True).start()
    return server, server.getsockname()[1]


def test_three_clones_on_user_networking_are_distinct_machines(kvm_guest_factory):
    guests = _three(kvm_guest_factory)
    assert all(g.template is not None for g in guests)  # restored, not booted
    idents = [read_identity(g) for g in guests]
    assert_distinct(guests, idents)
    server, port = _host_listener()
    try:
        for guest, ident in zip(guests, idents, strict=True):
            # The guest's network works with its new MAC: slirp gave its DHCP lease
            # to it (the address the SSH forward targets), and it reaches the host.
            assert "ADDRESS=10.0.2.15" in guest.succeed("cat /run/systemd/netif/leases/*")
            assert "10.0.2.15/24" in guest.succeed(f"ip -4 -o address show dev {ident.dev}")
            hello = guest.succeed(
                f"timeout 30 bash -c 'exec 3<>/dev/tcp/{guest.host_address}/{port}; head -c 5 <&3'"
            )
            assert hello == "hello"
            # journalctl still finds this boot (its directory follows the machine-id),
            # from the kernel's first line on, and what was logged since, by a journald
            # that started again with the clone's machine-id.
            guest.succeed("logger pytest-kvm-identity-mark")
            guest.wait_until_succeeds(
                "journalctl -b -o export --no-pager MESSAGE=pytest-kvm-identity-mark"
                f" | grep -qx _MACHINE_ID={ident.machine_id}",
                timeout=60,
            )
            assert "Linux version" in guest.succeed("journalctl -b -k --no-pager | head -n 3")
            # No other type of host key is left over from the template.
            assert guest.succeed("ls /etc/ssh | grep '^ssh_host_'").split() == [
                "ssh_host_ed25519_key",
                "ssh_host_ed25519_key.pub",
            ]
            assert guest.succeed("stat -c %a /etc/ssh/ssh_host_ed25519_key").strip() == "600"
            # The clone's key reached sshd whole: no error of its (a public half that
            # does not match the private one was one in every clone's journal).
            assert guest.succeed("journalctl -b -p err -t sshd -o cat --no-pager") == ""
    finally:
        server.close()


def test_clones_on_a_vlan_are_distinct_machines(kvm_guest_factory, kvm_vlan):
    guests = _three(kvm_guest_factory, vlan=kvm_vlan)
    idents = [read_identity(g) for g in guests]
    assert_distinct(guests, idents)
    vlan_macs = {g.vlan_macs[0] for g in guests}
    assert len(vlan_macs) == 3 and not vlan_macs & {g.mac for g in guests}
    for guest in guests:
        # Both NICs as QEMU sees them, and the vlan NIC's address on its own MAC.
        assert set(qemu_macs(guest)) == {guest.mac, guest.vlan_macs[0]}
        dev = guest.succeed(
            f"grep -l {guest.vlan_macs[0]} /sys/class/net/*/address | cut -d/ -f5"
        ).strip()
        assert dev != primary_dev(guest)
        addresses = guest.succeed(f"ip -4 -o address show dev {dev}")
        assert f"{kvm_vlan.address_of(guest)}/24" in addresses
    # The segment works between clones.
    a, b = guests[0], guests[1]
    hello = a.succeed(
        f"timeout 30 bash -c 'exec 3<>/dev/tcp/{kvm_vlan.address_of(b)}/22; head -c 4 <&3'"
    )
    assert hello == "SSH-"


# A clone stays itself after reboot: parity_suite.py's reboot test, run by test_libvirt.py
# on the qemu backend and on libvirt, local and remote (one reboot per backend for both
# that claim and the stopped disk's).


def test_without_the_guest_agent_the_identity_is_set_over_ssh(kvm_guest_factory):
    """As for an image without qemu-ga: the first connection meets the template's host
    key, then the pin moves to the clone's own (a reconnect and OpenSSH use it); the
    identity script, run over that first session, gives a user-mode clone its own MAC
    too, and the session survives it."""
    g = kvm_guest_factory()
    assert g.template is not None and g.template.agent  # the catalog image has qemu-ga
    template = dataclasses.replace(g.template, agent=False)
    with Guest(g._run, g.config, template=template) as clone:
        # The first connection was checked against the template's host key.
        first = clone.ssh.get_transport()
        offered = first.get_remote_server_key()
        assert fingerprint(offered) == fingerprint(template.host_key.public_key())
        # It outlived the MAC change the identity script made over it.
        assert clone.succeed("echo alive").strip() == "alive"
        assert clone.ssh.get_transport() is first
        clone.reconnect()  # a new handshake: the clone's own key, pinned
        ident = read_identity(clone)
        # A MAC of its own (not the template's nor its sibling's), the same in the
        # guest, in guest.mac and in QEMU; the address slirp's DHCP gave stays.
        assert clone.mac == ident.mac != template.mac
        assert clone.mac != g.mac
        assert clone.mac in qemu_macs(clone)
        assert "10.0.2.15/24" in clone.succeed(f"ip -4 -o address show dev {ident.dev}")
        assert ident.host_key_guest == ident.host_key_client
        assert ident.host_key_client != fingerprint(template.host_key.public_key())
        other = read_identity(g)
        assert ident.machine_id != other.machine_id and ident.iaid != other.iaid
        assert ident.hostname == clone.name[:63] != other.hostname
        argv = [*shlex.split(clone.ssh_command), "-o", "BatchMode=yes", "hostname"]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == clone.name


# The first command of a clone: its journal file's header (machine id at offset 40 of
# systemd's journal header), then what it logs, read back within a second.
JOURNAL_CHECK = (
    "id=$(cat /etc/machine-id); f=/var/log/journal/$id/system.journal; "
    'od -An -tx1 -j40 -N16 "$f" | tr -d " \\n"; echo; '
    "logger -t pytest-kvm-probe first-entry; "
    "for i in 1 2 3 4 5 6 7 8 9 10; do "
    "journalctl -b -o cat -t pytest-kvm-probe | grep -q first-entry && break; sleep 0.1; done; "
    "journalctl -b -o cat -t pytest-kvm-probe"
)


def _journal_is_the_clones(g) -> None:
    header_id, *entries = g.succeed(JOURNAL_CHECK).splitlines()
    # Written by a journald that knows the clone's machine-id (the restart is over):
    # before, a clone's first command met the template's file and a journald still
    # restarting, and what it logged showed only seconds later.
    assert header_id == g.succeed("cat /etc/machine-id").strip()
    assert entries == ["first-entry"]


def test_a_clones_first_command_finds_its_journal_running(kvm_guest_factory):
    """The clone's journald was restarted for its new machine-id; the clone is handed
    over once the new one writes (through qemu-ga, and over SSH without it)."""
    g = kvm_guest_factory()
    _journal_is_the_clones(g)
    assert g.template is not None and g.template.agent
    template = dataclasses.replace(g.template, agent=False)
    with Guest(g._run, g.config, template=template) as clone:
        _journal_is_the_clones(clone)
