"""One guest suite for every backend: test_libvirt.py runs it with ``--kvm-backend qemu``
and with ``--kvm-backend libvirt`` and both runs must pass.

Not collected by itself (no ``test_`` prefix); PKVM_EXPECT_BACKEND says which backend
the run is on, so a run that silently fell back to the other one fails.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shlex
import socket
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

# tests/support/identity.py, copied next to this file by test_libvirt.py (as tiny_boot).
from identity import qemu_macs, read_identity

from pytest_kvm.errors import CommandFailed

BACKEND = os.environ.get("PKVM_EXPECT_BACKEND", "qemu")
JUMP = os.environ.get("PKVM_EXPECT_JUMP", "")  # a remote hypervisor's SSH, user@host:port
OWNER = "{https://github.com/pytest-kvm/pytest-kvm/ns/1}owner"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_commands_files_and_console(kvm_guest, tmp_path: Path, request):
    g = kvm_guest
    assert g.backend == BACKEND
    _restored(g)
    assert (f"-J {JUMP} " in g.ssh_command) if JUMP else ("-J" not in g.ssh_command)
    r = g.run("echo out; echo err >&2; exit 3")
    assert (r.exit_status, r.stdout, r.stderr) == (3, "out\n", "err\n")
    with pytest.raises(CommandFailed):
        g.succeed("false")
    assert g.succeed("hostname").strip() == g.name
    assert g.mac in g.succeed("ip -o link")
    # put/get with a hostile name, quoted everywhere
    name = "a file 'with' \"quotes\"; $(touch PWNED)"
    local = tmp_path / "source.txt"
    local.write_text("payload\n" * 100)
    g.put(local, f"/tmp/{name}")
    assert g.succeed(f"sha256sum {shlex.quote('/tmp/' + name)}").split()[0] == _sha256(local)
    assert g.succeed("find / -xdev -name PWNED") == ""
    assert g.get(f"/tmp/{name}", tmp_path / "back.txt").read_text() == local.read_text()
    # OpenSSH with the pinned host key
    argv = [*shlex.split(g.ssh_command), "-o", "BatchMode=yes", "cat /etc/hostname"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == g.name
    # The serial console: logged from power-on, read and typed into.
    assert "Linux version" in g.serial_log.read_text(errors="replace")
    g.wait_for_console(r"\S+ login:", timeout=120)
    g.console.skip_to_end()
    g.succeed("echo pytest-kvm-marker-42 > /dev/ttyS0")
    g.console.expect("pytest-kvm-marker-42", timeout=30)
    g.console.skip_to_end()
    g.console.send("nosuchuser\n")  # getty asks for a password next
    g.console.expect("Password:", timeout=60)
    _pause_lines_reach_the_guest(g)
    _forward_port_agent_and_monitor(g)
    if BACKEND == "libvirt":
        _check_domain(g, request.node.nodeid)


def _pause_lines_reach_the_guest(g) -> None:
    """What --kvm-pause-on-failure prints is right on this backend: the SSH line runs
    a command, and what is typed into the console socket reaches the guest's getty."""
    from pytest_kvm.pause import reach_lines, release_console

    release_console(g)  # as the pause does: the socket is the user's now
    lines = reach_lines(g)
    ssh = next(line for line in lines if line.startswith("  ssh:")).partition(":")[2]
    out = subprocess.run([*shlex.split(ssh), "-o", "BatchMode=yes", "hostname"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.stdout.strip() == g.name, out.stderr
    console = next(line for line in lines if line.startswith("  console:"))
    assert ("(input; output: tail -f" in console) == (BACKEND == "libvirt")
    path = shlex.split(console.partition("UNIX-CONNECT:")[2])[0]
    g.console.skip_to_end()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        # getty is at "Password:" (the test typed a login name): it answers the line.
        sock.sendall(b"pausecheck\n")
        g.console.expect(r"Login incorrect|Password:", timeout=60)


def _restored(g) -> None:
    """The guest came from its template (both backends restore plain guests), not a boot."""
    assert "restore" in g.boot_timings, g.boot_timings
    assert f"{g.name}: restored from template" in g.serial_log.read_text(errors="replace")


def _forward_port_agent_and_monitor(g) -> None:
    g.succeed(
        "mkdir -p /srv/www && echo hello-from-guest >/srv/www/index.html && "
        "(cd /srv/www && nohup python3 -m http.server 8080 >/dev/null 2>&1 &)"
    )
    g.wait_for_port(8080)
    port = g.forward_port(8080)
    assert g.forwarded_ports[8080] == port
    # On a remote hypervisor the forward is on its host's 127.0.0.1: through the jump.
    conn = (g._jump.channel("127.0.0.1", port, 30) if JUMP
            else socket.create_connection(("127.0.0.1", port), timeout=30))  # fmt: skip
    with conn:
        conn.sendall(b"GET /index.html HTTP/1.0\r\n\r\n")
        reply = b""
        while chunk := conn.recv(4096):
            reply += chunk
    assert b"hello-from-guest" in reply
    assert g.agent_answers()
    assert g.qmp("query-status")["status"] == "running"


def _check_domain(g, nodeid: str) -> None:
    """What libvirt knows of the guest: a transient domain of ours, labelled."""
    name = g.machine.domain_name
    listed = subprocess.run(
        ["virsh", "-q", "list", "--transient", "--name"],  # at LIBVIRT_DEFAULT_URI
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert name in listed
    xml = subprocess.run(
        ["virsh", "dumpxml", name],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    root = ET.fromstring(xml)
    assert root.get("type") == ("kvm" if g._run.accel.name == "kvm" else "qemu")
    owner = root.find(f"metadata/{OWNER}")
    assert owner is not None
    assert owner.get("run") == g._run.identity.run_id
    assert owner.get("pid") == str(os.getpid())
    assert owner.get("test") == nodeid
    assert root.find("devices/graphics") is None  # no display unless one is asked for
    [disk] = [d for d in root.findall("devices/disk") if d.get("device") == "disk"]
    assert disk.find("source").get("pool") == "pytest-kvm"
    assert (
        disk.find("backingStore/source")
        .get("file")
        .startswith("/var/lib/libvirt/images/pytest-kvm/")
    )


def test_two_clones_are_two_machines(kvm_guest_factory):
    """Two guests restored from one template: each has its own MAC (in the guest, in
    guest.mac and, on libvirt, in the domain's XML), machine-id and host key, and its
    network works with it."""
    guests = [kvm_guest_factory(), kvm_guest_factory()]
    seen = []
    for g in guests:
        _restored(g)
        dev = g.succeed(f"grep -l {g.mac} /sys/class/net/*/address | cut -d/ -f5").strip()
        assert dev, g.succeed("ip -o link")
        # slirp's DHCP lease went to the new MAC: the address SSH reaches is the lease's.
        assert "10.0.2.15/24" in g.succeed(f"ip -4 -o address show dev {dev}")
        if g.backend == "libvirt":
            xml = subprocess.run(["virsh", "dumpxml", g.machine.domain_name],
                                 capture_output=True, text=True, check=True).stdout  # fmt: skip
            macs = [m.get("address") for m in ET.fromstring(xml).findall("devices/interface/mac")]
            assert macs == [g.mac]
        key = g.ssh.get_transport().get_remote_server_key().get_base64()
        seen.append((g.mac, g.succeed("cat /etc/machine-id").strip(), key))
    assert len({s[0] for s in seen}) == len({s[1] for s in seen}) == len({s[2] for s in seen}) == 2


def test_reboot_shutdown_and_the_stopped_disk(kvm_guest_factory):
    """A clone's reboot is a real one (a new boot id) and keeps what the clone is: its
    state on disk, the host name it was given, its identity (issue 20; one reboot for
    all, on every backend: each costs about a minute under TCG). Then a clean power-off
    and its disk read offline."""
    g = kvm_guest_factory(hostname="keeps-its-name")
    _restored(g)
    before = read_identity(g)
    boot_before = g.succeed("cat /proc/sys/kernel/random/boot_id")
    g.succeed("echo kept > /var/lib/pytest-kvm-state && sync")
    g.reboot()
    assert g.succeed("cat /proc/sys/kernel/random/boot_id") != boot_before
    assert g.succeed("cat /var/lib/pytest-kvm-state").strip() == "kept"
    assert g.succeed("hostname").strip() == "keeps-its-name"
    g.succeed("systemctl is-active ssh.service")
    # SSH is back: on the clone's own host key (the client pins it) and its DHCP
    # address, now asked for with the MAC the machine was started with.
    after = read_identity(g, dhcp_running=True)
    # networkd started again with the clone's machine-id (DUID) and IAID: the lease
    # was got with the clone's DHCP client id, no longer the template's.
    assert after.client_id != before.client_id
    assert after.client_id.startswith(f"ff{after.iaid}")
    assert dataclasses.replace(after, client_id="") == dataclasses.replace(before, client_id="")
    assert g.mac in qemu_macs(g)
    # The NIC came up with the clone's MAC: the template's is gone even as permaddr.
    assert g.template is not None and g.template.mac not in g.succeed("ip link")
    assert "Linux version" in g.succeed("journalctl -b -k --no-pager | head -n 3")
    g.succeed("logger -t parity still-here-after-reboot")
    g.shutdown()
    assert not g.is_running
    assert "reboot: Power down" in g.serial_log.read_text(errors="replace")
    pytest.importorskip("guestfs", reason="guest.disk needs python3-guestfs")
    assert g.disk.read_text("/var/lib/pytest-kvm-state") == "kept\n"
    assert "still-here-after-reboot" in g.disk.journal()


def _rfb_security_types(g, port: int) -> list[int]:
    """The start of the VNC (RFB 3.8) handshake: the authentications offered. On a
    remote hypervisor the display is on its 127.0.0.1: through the jump."""
    conn = (g._jump.channel("127.0.0.1", port, 30) if JUMP
            else socket.create_connection(("127.0.0.1", port), timeout=30))  # fmt: skip
    with conn:
        assert conn.recv(12).startswith(b"RFB 003.")
        conn.sendall(b"RFB 003.008\n")
        count = conn.recv(1)[0]
        return list(conn.recv(count))


@pytest.mark.kvm(vnc=True)
def test_install_media_on_a_blank_disk_with_display_and_vnc(kvm_guest_factory, tmp_path):
    """An installer's plumbing: boot a CD on an empty disk, no SSH; the console, the
    screen (picture and text), VNC with a password, power-off, the disk kept."""
    from tiny_boot import build_tiny_iso

    iso = build_tiny_iso(tmp_path / "tiny install.iso")
    inst = kvm_guest_factory(cdrom=iso, boot="cdrom", disk_size="64M", ssh=False)
    assert inst.backend == BACKEND
    inst.console.expect("press a key to power off", timeout=120)
    assert "Booting from DVD/CD" in inst.screen_text()
    shot = inst.screenshot(tmp_path / "bios.png")
    assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 1000
    assert inst.vnc is not None and inst.vnc[0] == "127.0.0.1"
    assert _rfb_security_types(inst, inst.vnc[1]) == [2]  # VNC password auth only
    password = inst.vnc_password_file.read_text().strip()
    if BACKEND == "libvirt":
        xml = subprocess.run(
            ["virsh", "dumpxml", inst.machine.domain_name],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        graphics = ET.fromstring(xml).find("devices/graphics")
        assert graphics is not None and graphics.get("type") == "vnc"
        assert password not in xml  # libvirt shows it only with --security-info
    assert password not in " ".join(inst.machine.argv)
    inst.console.send("x")
    inst.wait_for_shutdown(timeout=60)
    # The disk it ran with: empty, 64 MiB, kept as a standalone image.
    saved = inst.save_image(tmp_path / "saved.qcow2")
    info = subprocess.run(["qemu-img", "info", "--output=json", str(saved)],
                          capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert '"virtual-size": 67108864' in info and "backing-filename" not in info
