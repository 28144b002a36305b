"""A clone's own identity: the saved state with its MAC, and the script the guest runs."""

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from pytest_kvm.errors import GuestError
from pytest_kvm.guest.identity import (
    HOST_KEY,
    CloneIdentity,
    mac_bytes,
    substitute_mac,
    write_clone_state,
)

OLD = "02:6b:76:6c:b3:b3"
NEW = "02:6b:76:d9:8c:9c"


def test_mac_bytes():
    assert mac_bytes(OLD) == bytes([0x02, 0x6B, 0x76, 0x6C, 0xB3, 0xB3])


def test_every_copy_of_the_mac_in_the_state_is_replaced():
    # slirp's DHCP table, and twice in the virtio-net device, among other bytes
    state = b"QEVM" + mac_bytes(OLD) + b"\x00" * 7 + mac_bytes(OLD) + b"xy" + mac_bytes(OLD)
    data, count = substitute_mac(state, OLD, NEW)
    assert count == 3
    assert mac_bytes(OLD) not in data and data.count(mac_bytes(NEW)) == 3
    assert len(data) == len(state)
    assert data.replace(mac_bytes(NEW), mac_bytes(OLD)) == state


def test_the_clone_gets_a_private_copy(tmp_path: Path):
    template = tmp_path / "state"
    template.write_bytes(b"head" + mac_bytes(OLD) + b"tail")
    copy = write_clone_state(template, tmp_path / "clone-state", OLD, NEW, "guest 'g'")
    assert copy.read_bytes() == b"head" + mac_bytes(NEW) + b"tail"
    assert template.read_bytes() == b"head" + mac_bytes(OLD) + b"tail"  # unchanged


def test_a_state_without_the_mac_is_a_clear_error(tmp_path: Path):
    template = tmp_path / "state"
    template.write_bytes(b"no mac in here")
    with pytest.raises(GuestError, match=f"does not hold its MAC {OLD}"):
        write_clone_state(template, tmp_path / "copy", OLD, NEW, "guest 'g'")
    assert not (tmp_path / "copy").exists()


def test_each_clone_is_new():
    a = CloneIdentity.new(OLD, NEW, "a")
    b = CloneIdentity.new(OLD, NEW, "b")
    assert a.machine_id != b.machine_id and len(a.machine_id) == 32
    assert int(a.machine_id, 16) >= 0
    assert a.iaid != b.iaid and 0 <= a.iaid < 2**32
    assert a.host_key.public_openssh != b.host_key.public_openssh


def _sh_syntax(script: str) -> None:
    subprocess.run(["sh", "-n", "-c", script], check=True)


@pytest.mark.parametrize("bridge", [False, True])
@pytest.mark.parametrize("private", [False, True])
def test_the_script(bridge: bool, private: bool):
    ident = CloneIdentity.new(OLD, NEW, "web-1", bridge=bridge)
    script = ident.script(1700000000.25, host_private_key=private, more="echo vlans")
    _sh_syntax(script)
    assert "date -u -s @1700000000.250000" in script
    if bridge:  # down and up around the new MAC: networkd is stopped meanwhile
        assert f'"$dev" {NEW} "$dev" | ip -batch -' in script
    else:  # no carrier loss (networkd would drop the address): the MAC, announced
        assert f'ip link set dev "$dev" address {NEW}' in script
        assert script.index("arp_notify") < script.index(f"address {NEW}")
        assert "address add fe80::" in script
    assert ident.machine_id in script and f"IAID={ident.iaid}" in script
    # Both halves of the host key over SSH; with qemu-ga, the agent wrote both before
    # SSH connected (a half-written pair is an error of sshd's in the journal).
    assert (shlex.quote(ident.host_key.public_openssh) in script) == private
    assert (ident.host_key.private_openssh in script) == private
    assert (f">{HOST_KEY}\n" in script) == private
    assert ("ip -4 address flush" in script) == bridge
    # journald starts again (with the new machine-id) before the hand-over: in the
    # foreground, once the machine-id is written (the error gate's cursor follows).
    kill = script.index("systemd-journal")
    assert script.index(f"printf '%s\\n' {ident.machine_id}") < kill
    assert "&" not in script[:kill].replace("&&", "").replace(">&", "")
    if not bridge:
        assert kill < script.index("echo vlans") < script.index("(\n")


def test_the_hostname_is_quoted():
    script = CloneIdentity.new(OLD, NEW, "a;reboot").script(0, False)
    assert "'a;reboot'" in script


def _run(script: str, root: Path) -> subprocess.CompletedProcess[str]:
    """The script against a fake root: its absolute paths moved under ``root``, and
    the commands that would change this host (date, ip, systemctl) logged instead."""
    # What the script leaves running in the background runs in the foreground here,
    # so that its effects can be checked once it returns.
    text = script.replace(") </dev/null >/dev/null 2>&1 &", ")")
    for path in (
        "/etc/",
        "/var/",
        "/run/",
        "/sys/",
        "/proc/",
        "/usr/lib/",
        "/usr/libexec/",
        "/lib/",
    ):
        text = text.replace(f" {path}", f" {root}{path}").replace(f"<{path}", f"<{root}{path}")
        text = text.replace(f">{path}", f">{root}{path}").replace(f'"{path}', f'"{root}{path}')
    # Never run it on this host's own files: every such path must have moved.
    left = re.findall(r"(?<![\w/.-])/(?:etc|var|run|sys|proc|usr|lib)/", text)
    assert not left, left
    bin_dir = root / "bin"
    bin_dir.mkdir()
    for name in ("date", "ip", "systemctl"):
        fake = bin_dir / name
        fake.write_text(
            f'#!/bin/sh\necho {name} "$@" >>{root}/log\n'
            f'case "$*" in *-batch*) cat >>{root}/log;; esac\n'
        )
        fake.chmod(0o755)
    return subprocess.run(
        ["sh", "-c", text], capture_output=True, text=True,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin"}, check=False,
    )  # fmt: skip


def test_the_script_on_a_fake_guest(tmp_path: Path):
    root = tmp_path
    for d in ("etc/ssh", "etc/systemd/network", "etc/cloud/cloud.cfg.d", "var/lib/dbus",
              "var/log/journal/0ld1d", "run/systemd/system", "sys/class/net/lo",
              "sys/class/net/enp0s6", "proc/sys/kernel", "proc/sys/net/ipv4/conf/enp0s6",
              "proc/sys/net/ipv6/conf/enp0s6"):  # fmt: skip
        (root / d).mkdir(parents=True)
    (root / "sys/class/net/lo/address").write_text("00:00:00:00:00:00\n")
    (root / "sys/class/net/enp0s6/address").write_text(OLD + "\n")
    (root / "proc/sys/net/ipv4/conf/enp0s6/arp_notify").write_text("0\n")
    (root / "etc/machine-id").write_text("0ld1d\n")
    (root / "var/lib/dbus/machine-id").write_text("0ld1d\n")
    (root / "var/log/journal/0ld1d/system.journal").write_text("the template's entries")
    (root / "etc/ssh/ssh_host_rsa_key").write_text("rsa")
    (root / "etc/ssh/ssh_host_ed25519_key.pub").write_text("old")
    (root / "etc/systemd/network/10-dhcp.network").write_text(
        "[Match]\nName=en*\n[Network]\nDHCP=yes\n"
    )
    (root / "etc/systemd/network/20-static.network").write_text(
        f"[Match]\nMACAddress={OLD.upper()}\n[Network]\nAddress=10.1.0.2/24\n"
    )
    # journald (by its name in /proc, as the kernel truncates it) and another process
    journald = subprocess.Popen(["sleep", "60"])
    other = subprocess.Popen(["sleep", "60"])
    try:
        for proc, comm in ((journald, "systemd-journal"), (other, "systemd-journal-x")):
            (root / f"proc/{proc.pid}").mkdir()
            (root / f"proc/{proc.pid}/comm").write_text(comm + "\n")
        ident = CloneIdentity.new(OLD, NEW, "web-1")
        result = _run(ident.script(5.0, host_private_key=True), root)
        assert result.returncode == 0, result.stderr
        assert journald.wait(10) == -15  # SIGTERM: systemd starts it again
        assert other.poll() is None
    finally:
        for proc in (journald, other):
            proc.kill()
            proc.wait()
    log = (root / "log").read_text()
    assert f"ip link set dev enp0s6 address {NEW}\n" in log
    assert (root / "proc/sys/net/ipv4/conf/enp0s6/arp_notify").read_text() == "1\n"
    assert "address add fe80::" in log
    assert "systemctl" not in log  # journald is restarted without it
    assert (root / "etc/machine-id").read_text() == ident.machine_id + "\n"
    assert (root / "var/lib/dbus/machine-id").read_text() == ident.machine_id + "\n"
    journal = root / "var/log/journal" / ident.machine_id
    assert journal.is_dir()  # the journal follows
    assert not (root / "var/log/journal/0ld1d").exists()
    # its active file archived under the name journald gives a file it cannot reuse
    # (journalctl reads it), so that the system.journal there is the new journald's:
    # the script names it for the harness to wait for
    assert not (journal / "system.journal").exists()
    (archived,) = journal.glob("system@*.journal~")
    assert archived.read_text() == "the template's entries"
    assert ident.journal_files(result.stdout) == [str(journal / "system.journal")]
    assert not (root / "etc/ssh/ssh_host_rsa_key").exists()
    assert (root / "etc/ssh/ssh_host_ed25519_key").read_text() == ident.host_key.private_openssh
    assert (root / "etc/ssh/ssh_host_ed25519_key.pub").read_text().strip() == (
        ident.host_key.public_openssh
    )
    assert (root / "etc/hostname").read_text() == "web-1\n"
    assert (root / "proc/sys/kernel/hostname").read_text() == "web-1"
    assert NEW in (root / "etc/systemd/network/20-static.network").read_text()
    dropin = root / "etc/systemd/network/10-dhcp.network.d/50-pytest-kvm-clone.conf"
    assert dropin.read_text() == f"[DHCPv4]\nIAID={ident.iaid}\n"
    assert not (root / "etc/systemd/network/20-static.network.d").exists()


def test_the_script_says_when_the_nic_is_missing(tmp_path: Path):
    (tmp_path / "sys/class/net/lo").mkdir(parents=True)
    (tmp_path / "sys/class/net/lo/address").write_text("00:00:00:00:00:00\n")
    for d in ("etc/ssh", "proc/sys/kernel"):
        (tmp_path / d).mkdir(parents=True)
    result = _run(CloneIdentity.new(OLD, NEW, "x").script(0, False), tmp_path)
    assert result.returncode == 3
    assert f"no network interface with MAC {OLD}" in result.stderr


def test_a_clone_that_keeps_the_mac_leaves_the_nic_alone():
    script = CloneIdentity.new(OLD, OLD, "x").script(0, True)
    assert "ip -batch" not in script and "/sys/class/net" not in script
    assert "machine-id" in script


def test_on_user_networking_the_mac_goes_first_and_networkd_waits_in_the_background():
    """The new MAC (announced: arp_notify) before anything else; what only networkd's
    restart and the next boot need, in the background after the vlan NICs (journald's
    restart is not: see the test above)."""
    ident = CloneIdentity.new(OLD, NEW, "x")
    script = ident.script(0, False, more="echo vlans")
    assert script.index("arp_notify") < script.index(f"address {NEW}") < script.index("date")
    background = script[script.rindex("\n(\n") :]
    assert background.endswith(") </dev/null >/dev/null 2>&1 &\n")
    assert f"IAID={ident.iaid}" in background and "systemd-journal" not in background
    assert script.index("echo vlans") < script.index(background)
    assert ident.machine_id in script[: script.index(background)]


def test_the_link_local_address_is_the_eui64_of_the_new_mac():
    lines = CloneIdentity.new(OLD, "52:54:00:12:34:56", "x")._link_local_lines()
    assert any("fe80::5054:ff:fe12:3456/64" in line for line in lines)


def test_sshd_that_holds_its_keys_is_restarted_only_where_ssh_writes_the_key():
    """OpenSSH 9.8+ (sshd-session) reads host keys once: over SSH the script restarts
    it for the new key; with qemu-ga, the clone's start does, before SSH connects."""
    from pytest_kvm.guest.identity import RELOAD_HOST_KEYS

    ident = CloneIdentity.new(OLD, NEW, "x")
    assert RELOAD_HOST_KEYS in ident.script(0, host_private_key=True)
    assert RELOAD_HOST_KEYS not in ident.script(0, host_private_key=False)
    _sh_syntax(RELOAD_HOST_KEYS)
    assert "sshd-session" in RELOAD_HOST_KEYS


def test_no_journal_to_wait_for_where_no_journald_was_restarted(tmp_path: Path):
    """A guest without a running journald (sysvinit; here: no such process) keeps its
    journal directory's move, and the script names nothing to wait for."""
    root = tmp_path
    for d in ("etc/ssh", "var/log/journal/0ld1d", "sys/class/net/eth0", "proc/sys/kernel"):
        (root / d).mkdir(parents=True)
    (root / "sys/class/net/eth0/address").write_text(OLD + "\n")
    (root / "etc/machine-id").write_text("0ld1d\n")
    (root / "var/log/journal/0ld1d/system.journal").write_text("entries")
    ident = CloneIdentity.new(OLD, NEW, "web-2")
    result = _run(ident.script(5.0, host_private_key=False), root)
    assert result.returncode == 0, result.stderr
    assert ident.journal_files(result.stdout) == []
