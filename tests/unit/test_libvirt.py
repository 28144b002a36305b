"""The libvirt backend's logic: URIs, domain and volume XML, error messages."""

from __future__ import annotations

import os
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import pytest

from pytest_kvm.backends.base import Drive, MachineSpec
from pytest_kvm.backends.libvirt import (
    _VOLUME,
    METADATA_NS,
    LibvirtMachine,
    LibvirtTarget,
    _connect_message,
    _volume_xml,
    connect,
    domain_xml,
    is_remote,
    volume_name,
)
from pytest_kvm.config import NetworkSpec
from pytest_kvm.errors import GuestLaunchError, KvmConfigError

from .test_argv import spec as argv_spec

DISKS = [("pytest-kvm", "pytest-kvm-g-0.qcow2", "qcow2", "disk"),
         ("pytest-kvm", "pytest-kvm-g-1.raw", "raw", "cdrom")]  # fmt: skip


def spec(tmp_path: Path, **kw) -> MachineSpec:
    return argv_spec(tmp_path, **{"memory": 768, **kw})


@pytest.mark.parametrize(
    ("uri", "remote"),
    [
        ("qemu:///system", False),
        ("qemu:///session", False),
        ("qemu+unix:///system?socket=/tmp/s", False),
        ("qemu:///system?socket=/tmp/pytest-of-root/libvirtd0/run/libvirt-sock", False),
        ("qemu+ssh://root@127.0.0.1:2222/system?socket=/run/x/libvirt-sock", True),
        ("qemu+ssh://root@127.0.0.1/system", True),
        ("qemu+tcp://host/system", True),
        ("qemu://host/system", True),
        ("test:///default", False),
    ],
)
def test_remote_uris(uri, remote):
    assert is_remote(uri) is remote


def test_domain_xml_is_a_labelled_tcg_domain_on_pool_volumes(tmp_path):
    labels = (("run", "ab12"), ("worker", "gw1"), ("pid", "42"), ("test", "t.py::x[a b]"))
    root = ET.fromstring(domain_xml(spec(tmp_path), "pytest-kvm-x", "qemu", DISKS, labels))
    assert root.get("type") == "qemu"
    assert root.findtext("name") == "pytest-kvm-x"
    owner = root.find(f"metadata/{{{METADATA_NS}}}owner")
    assert owner is not None and dict(owner.attrib) == dict(labels)
    assert root.find("memory").text == "768" and root.find("memory").get("unit") == "MiB"
    assert root.find("cpu").get("mode") == "maximum"
    assert root.find("genid") is not None
    disk, cdrom = root.findall("devices/disk")
    assert disk.find("source").attrib == {"pool": "pytest-kvm", "volume": "pytest-kvm-g-0.qcow2"}
    assert disk.find("target").attrib == {"dev": "vda", "bus": "virtio"}
    assert disk.find("driver").get("type") == "qcow2"
    assert cdrom.get("device") == "cdrom" and cdrom.find("readonly") is not None
    nic = root.find("devices/interface")
    assert nic.get("type") == "user" and nic.find("mac").get("address") == "02:6b:76:00:00:01"
    channel = root.find("devices/channel/target")
    assert channel.get("name") == "org.qemu.guest_agent.0"
    assert root.find("devices/serial").get("type") == "pty"
    assert root.find("devices/graphics") is None  # nothing listens without being asked


def test_domain_xml_on_kvm_passes_the_host_cpu(tmp_path):
    root = ET.fromstring(domain_xml(spec(tmp_path), "d", "kvm", DISKS))
    assert root.get("type") == "kvm" and root.find("cpu").get("mode") == "host-passthrough"


def test_domain_xml_escapes_hostile_labels(tmp_path):
    hostile = "t.py::x['\"<&>]"
    text = domain_xml(spec(tmp_path), "d", "qemu", DISKS, (("test", hostile),))
    owner = ET.fromstring(text).find(f"metadata/{{{METADATA_NS}}}owner")
    assert owner.get("test") == hostile


def test_what_libvirt_cannot_do_yet_is_refused_clearly(tmp_path):
    with pytest.raises(GuestLaunchError, match="kernel_args"):
        domain_xml(spec(tmp_path, kernel=tmp_path / "vmlinuz"), "d", "qemu", DISKS)
    target = LibvirtTarget("qemu:///system")
    with pytest.raises(KvmConfigError, match="templates are not supported"):
        LibvirtMachine(spec(tmp_path, ram_file=tmp_path / "ram"), target, "tcg")
    encrypted = (Drive(tmp_path / "d.qcow2", encrypted=(True,), secret=tmp_path / "k"),)
    with pytest.raises(KvmConfigError, match="encrypted images are not supported"):
        LibvirtMachine(spec(tmp_path, drives=encrypted), target, "tcg")


def test_volume_xml_is_private_and_declares_its_backing():
    root = ET.fromstring(_volume_xml("o.qcow2", 3 << 30, "qcow2", "/pool/base.qcow2"))
    assert root.findtext("name") == "o.qcow2" and root.findtext("capacity") == str(3 << 30)
    assert root.find("target/permissions/mode").text == "0600"
    assert root.find("backingStore/path").text == "/pool/base.qcow2"
    assert root.find("backingStore/format").get("type") == "qcow2"


@pytest.mark.parametrize(
    ("error", "hint"),
    [
        ("Failed to connect socket to '/run/libvirt/libvirt-sock': Permission denied",
         "you may not use it"),
        ("internal error: Unable to get system bus connection: Could not connect",
         "you may not use it"),
        ("authentication unavailable: no polkit agent available", "you may not use it"),
        ("Failed to connect socket to '/x': No such file or directory", "is libvirtd running"),
        ("Cannot recv data: ssh: connect to host h port 22: Connection refused",
         "is libvirtd running"),
        ("no connection driver available for foo:///", "has no driver for it"),
    ],
)  # fmt: skip
def test_connect_errors_name_the_uri_and_a_way_out(error, hint):
    message = _connect_message("qemu:///system", Exception(error + "\nsecond line"))
    assert message.startswith(f"--kvm-uri qemu:///system: cannot connect ({error})")
    assert hint in message
    assert "second line" not in message


def test_a_hypervisor_that_is_not_qemu_is_refused():
    pytest.importorskip("libvirt")
    with pytest.raises(KvmConfigError, match="that hypervisor is TEST, not QEMU"):
        connect("test:///default")


def test_volume_names_carry_their_owner():
    name = volume_name("pytest-kvm-kvm-ab12-gw0-03", 1, "raw")
    match = _VOLUME.match(name)
    assert match is not None and int(match.group(2)) == os.getpid()
    assert _VOLUME.match("debian-12-390b636410b7-d172f09eb6082e42b51d.qcow2") is None
    assert _VOLUME.match("debian-12-390b636410b7-d172f09eb6082e42b51d.qcow2.ok") is None


@pytest.mark.parametrize(
    ("network", "kind", "source"),
    [(NetworkSpec("libvirt", "default"), "network", {"network": "default"}),
     (NetworkSpec("bridge", "br0"), "bridge", {"bridge": "br0"})],
)  # fmt: skip
def test_domain_xml_networks(tmp_path, network, kind, source):
    root = ET.fromstring(domain_xml(spec(tmp_path, network=network), "d", "qemu", DISKS))
    nic = root.find("devices/interface")
    assert nic.get("type") == kind and nic.find("source").attrib == source
    assert nic.find("mac").get("address") == "02:6b:76:00:00:01"


def test_remote_hypervisors_need_an_ssh_transport():
    from pytest_kvm.backends.libvirt import jump_for, remote_problem

    assert remote_problem("qemu:///system") == ""
    assert remote_problem("qemu+ssh://root@hv/system") == ""
    assert remote_problem("qemu+libssh2://root@hv/system") == ""
    assert "use qemu+ssh://USER@HOST/system" in remote_problem("qemu+tcp://hv/system")
    assert jump_for("qemu:///system") is None
    jump = jump_for("qemu+ssh://alice@hv:2222/system")
    assert jump is not None and jump.spec == "alice@hv:2222"
    assert jump_for("qemu+ssh://alice@hv:2222/system") is jump  # one per URI
    # A private daemon's socket (the libvirt tests' own) changes nothing of that.
    assert remote_problem("qemu:///system?socket=/run/x/libvirt-sock") == ""
    assert jump_for("qemu:///system?socket=/run/x/libvirt-sock") is None
    other = jump_for("qemu+ssh://alice@hv:2222/system?socket=/run/x/libvirt-sock")
    assert other is not None and other.spec == "alice@hv:2222"


def test_domain_xml_display_and_vnc(tmp_path):
    shown = ET.fromstring(domain_xml(spec(tmp_path, display=True), "d", "qemu", DISKS))
    assert shown.find("devices/video/model").get("type") == "vga"
    assert shown.find("devices/graphics") is None
    (tmp_path / "vnc-password").write_text("s3cretPW\n")
    watched = ET.fromstring(domain_xml(spec(tmp_path, vnc=True), "d", "qemu", DISKS))
    graphics = watched.find("devices/graphics")
    assert graphics.get("type") == "vnc" and graphics.get("passwd") == "s3cretPW"
    assert graphics.get("listen") == "127.0.0.1"
    assert graphics.find("listen").attrib == {"type": "address", "address": "127.0.0.1"}


def test_the_xml_shown_as_argv_hides_the_vnc_password(tmp_path):
    (tmp_path / "vnc-password").write_text("s3cretPW\n")
    machine = LibvirtMachine(spec(tmp_path, vnc=True), LibvirtTarget("qemu:///system"), "tcg")
    machine._xml = domain_xml(machine.spec, "d", "qemu", DISKS)
    assert "s3cretPW" in machine._xml  # libvirt needs it...
    shown = "\n".join(machine.argv)  # ...artifacts must not have it
    assert "s3cretPW" not in shown and 'passwd="(hidden)"' in shown


@pytest.mark.parametrize("fresh_answers", [True, False])
def test_a_destroy_that_never_returns_is_done_again_over_a_new_connection(
    tmp_path, monkeypatch, capsys, fresh_answers
):
    """A libvirt client connection that deadlocks in destroy (seen in CI with a
    console stream read on another thread) costs DESTROY_WAIT, not the run."""
    libvirt = pytest.importorskip("libvirt")
    from pytest_kvm.backends import libvirt as backend

    monkeypatch.setattr(backend, "DESTROY_WAIT", 0.2)
    release = threading.Event()
    done: list[object] = []

    class StuckDomain:
        def isActive(self):
            return True

        def destroy(self):
            release.wait(30)

    class StuckVolume:
        def name(self):
            return "pytest-kvm-g.0.qcow2"

        def delete(self, flags):
            raise AssertionError("the stuck connection is not used again")

    class Fresh:
        def lookupByName(self, name):
            if not fresh_answers:
                release.wait(30)
            return SimpleNamespace(destroy=lambda: done.append(("destroy", name)))

        def storagePoolLookupByName(self, name):
            def volume(vol):
                return SimpleNamespace(delete=lambda flags: done.append(("delete", name, vol)))

            return SimpleNamespace(storageVolLookupByName=volume)

        def setKeepAlive(self, interval, count):
            pass

        def close(self):
            done.append("close")

    monkeypatch.setattr(libvirt, "open", lambda uri: Fresh())
    machine = LibvirtMachine(spec(tmp_path), LibvirtTarget("qemu:///system"), "tcg")
    stuck = object()
    monkeypatch.setitem(backend._connections, "qemu:///system", stuck)
    machine._conn, machine._domain = stuck, StuckDomain()
    machine._volumes = [StuckVolume()]
    try:
        started = time.monotonic()
        machine.close()
        machine.close()
        assert time.monotonic() - started < 5
        assert "qemu:///system" not in backend._connections  # later guests connect anew
        err = capsys.readouterr().err
        if fresh_answers:
            assert done == [("destroy", machine.domain_name),
                            ("delete", "pytest-kvm", "pytest-kvm-g.0.qcow2"), "close"]  # fmt: skip
            assert "destroyed it over a new connection" in err
        else:
            assert done == []
            assert f"virsh -c qemu:///system destroy {machine.domain_name}" in err
    finally:
        release.set()


class _Client:
    """A fake libvirt client connection: one call at a time, like a connection
    whose I/O one waiting thread drives; a blocking stream read holds it until the
    stream ends."""

    def __init__(self, libvirt, log: list[str], name: str) -> None:
        self.lock = threading.Lock()
        self.ended = threading.Event()
        self.libvirt, self.log, self.name = libvirt, log, name

    def newStream(self, flags):
        return _Stream(self, flags)

    def lookupByUUIDString(self, uuid):
        return _Domain(self, uuid)

    def setKeepAlive(self, interval, count):
        pass

    def close(self):
        self.log.append(f"close {self.name}")


class _Stream:
    def __init__(self, client: _Client, flags: int) -> None:
        self.client, self.flags = client, flags

    def recv(self, nbytes):
        if self.flags & self.client.libvirt.VIR_STREAM_NONBLOCK:
            return b"" if self.client.ended.is_set() else -2
        with self.client.lock:  # blocks the connection until there is data
            self.client.ended.wait(30)
            return b""

    def send(self, data):
        return len(data)

    def abort(self):
        with self.client.lock:
            self.client.log.append(f"abort on {self.client.name}")


class _Domain:
    def __init__(self, client: _Client, uuid: str = "u-1") -> None:
        self.client, self.uuid, self.active = client, uuid, True

    def UUIDString(self):
        return self.uuid

    def openConsole(self, dev, stream, flags):
        self.client.log.append(f"console on {self.client.name}")

    def isActive(self):
        return self.active

    def destroy(self):
        with self.client.lock:
            self.active = False
            self.client.log.append(f"destroy on {self.client.name}")


def test_console_stream_never_holds_up_destroy(tmp_path, monkeypatch):
    """The console is read on a connection of its own, without blocking: destroy on
    the domain's connection returns at once, however long the console stays quiet
    (CI saw virDomainDestroy and virStreamRecv blocked on one shared connection)."""
    libvirt = pytest.importorskip("libvirt")
    from pytest_kvm.backends import libvirt as backend

    monkeypatch.setattr(backend, "DESTROY_WAIT", 2.0)
    log: list[str] = []
    domain_conn, console_conn = _Client(libvirt, log, "domain"), _Client(libvirt, log, "console")
    monkeypatch.setattr(libvirt, "open", lambda uri: console_conn)
    monkeypatch.setattr(backend, "ensure_event_loop", lambda: None)
    machine = LibvirtMachine(spec(tmp_path), LibvirtTarget("qemu:///system"), "tcg")
    machine._conn, machine._domain = domain_conn, _Domain(domain_conn)
    machine._open_console()
    time.sleep(0.2)  # the console reader is waiting for output
    started = time.monotonic()
    machine.close()
    console_conn.ended.set()
    assert time.monotonic() - started < 1.0 and not machine._stuck
    assert log == ["console on console", "destroy on domain", "abort on console", "close console"]
