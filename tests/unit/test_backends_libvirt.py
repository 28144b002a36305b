"""The libvirt backend's logic: URIs, domain and volume XML, error messages."""

from __future__ import annotations

import os
import threading
import time
import xml.etree.ElementTree as ET
from types import SimpleNamespace

import pytest

from pytest_kvm.backends.base import Drive
from pytest_kvm.backends.libvirt import (
    METADATA_NS,
    LibvirtMachine,
    LibvirtTarget,
    connect,
    domain_xml,
    is_remote,
    volume_name,
)
from pytest_kvm.backends.libvirt.connection import _connect_message
from pytest_kvm.backends.libvirt.storage import _VOLUME, volume_xml
from pytest_kvm.config import NetworkSpec
from pytest_kvm.errors import GuestLaunchError, KvmConfigError
from tests.support.specs import LIBVIRT_DISKS as DISKS
from tests.support.specs import libvirt_spec as spec


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
    # Templates are not refused: a template's RAM file is ignored (its save image
    # holds the RAM), a clone restores from its incoming save image.
    LibvirtMachine(spec(tmp_path, ram_file=tmp_path / "ram"), target, "tcg")
    encrypted = (Drive(tmp_path / "d.qcow2", encrypted=(True,), secret=tmp_path / "k"),)
    with pytest.raises(KvmConfigError, match="encrypted images are not supported"):
        LibvirtMachine(spec(tmp_path, drives=encrypted), target, "tcg")


def test_volume_xml_is_private_and_declares_its_backing():
    root = ET.fromstring(volume_xml("o.qcow2", 3 << 30, "qcow2", "/pool/base.qcow2"))
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
    from pytest_kvm.backends.libvirt import connection
    from pytest_kvm.backends.libvirt import machine as machine_module

    monkeypatch.setattr(machine_module, "DESTROY_WAIT", 0.2)
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
    monkeypatch.setitem(connection._connections, "qemu:///system", stuck)
    machine._conn, machine._domain = stuck, StuckDomain()
    machine._volumes = [StuckVolume()]
    try:
        started = time.monotonic()
        machine.close()
        machine.close()
        assert time.monotonic() - started < 5
        assert "qemu:///system" not in connection._connections  # later guests connect anew
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
    from pytest_kvm.backends.libvirt import connection, console
    from pytest_kvm.backends.libvirt import machine as machine_module

    for module in (machine_module, console):
        monkeypatch.setattr(module, "DESTROY_WAIT", 2.0)
    log: list[str] = []
    domain_conn, console_conn = _Client(libvirt, log, "domain"), _Client(libvirt, log, "console")
    monkeypatch.setattr(libvirt, "open", lambda uri: console_conn)
    monkeypatch.setattr(connection, "ensure_event_loop", lambda: None)
    machine = LibvirtMachine(spec(tmp_path), LibvirtTarget("qemu:///system"), "tcg")
    machine._conn, machine._domain = domain_conn, _Domain(domain_conn)
    machine._open_console()
    time.sleep(0.2)  # the console reader is waiting for output
    started = time.monotonic()
    machine.close()
    console_conn.ended.set()
    assert time.monotonic() - started < 1.0 and not machine._stuck
    assert log == ["console on console", "destroy on domain", "abort on console", "close console"]


class _Pool:
    """A fake storage pool: volumes by name, an upload blocks while ``hold`` is set."""

    def __init__(self, libvirt) -> None:
        self.libvirt = libvirt
        self.volumes: dict[str, _Vol] = {}
        self.deleted: list[str] = []

    def refresh(self, flags):
        pass

    def listAllVolumes(self, flags):
        return list(self.volumes.values())

    def storageVolLookupByName(self, name):
        if name not in self.volumes:
            raise self.libvirt.libvirtError(f"no storage vol with matching name '{name}'")
        return self.volumes[name]

    def createXML(self, xml, flags):
        name = ET.fromstring(xml).findtext("name")
        assert name not in self.volumes
        self.volumes[name] = _Vol(self, name)
        return self.volumes[name]


class _Vol:
    def __init__(self, pool: _Pool, name: str) -> None:
        self.pool, self._name, self.data = pool, name, b""

    def name(self):
        return self._name

    def path(self):
        return f"/pool/{self._name}"

    def delete(self, flags):
        self.pool.deleted.append(self._name)
        del self.pool.volumes[self._name]

    def upload(self, stream, offset, length, flags):
        stream.target = self


class _UploadConn:
    def __init__(self, hold: threading.Event | None = None) -> None:
        self.hold, self.sending = hold, threading.Event()

    def getURI(self):
        return "qemu+ssh://root@hv/system"

    def newStream(self, flags):
        return _UploadStream(self)


class _UploadStream:
    def __init__(self, conn: _UploadConn) -> None:
        self.conn, self.target = conn, None

    def sendAll(self, handler, src):
        self.conn.sending.set()
        if self.conn.hold is not None:
            self.conn.hold.wait(10)
        while chunk := handler(self, 1 << 16, src):
            self.target.data += chunk

    def finish(self):
        pass


def test_nobody_uses_or_deletes_an_upload_before_it_is_complete(tmp_path):
    """Two runs with different caches (or hosts) upload the same image to one pool
    at once: the second neither deletes the first's upload in progress nor uses it
    half-written; each volume in use is complete."""
    import subprocess

    libvirt = pytest.importorskip("libvirt")
    from pytest_kvm.backends import libvirt as backend

    image = tmp_path / "img.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M"], check=True)
    pool = _Pool(libvirt)
    hold = threading.Event()
    first_conn, first = _UploadConn(hold), []
    uploader = threading.Thread(
        target=lambda: first.append(
            backend.upload_image(first_conn, pool, image, tmp_path / "cache-a")
        )
    )
    uploader.start()
    try:
        assert first_conn.sending.wait(10)  # the first upload is under way
        second = backend.upload_image(_UploadConn(), pool, image, tmp_path / "cache-b")
        assert pool.deleted == []
        assert second.data == image.read_bytes()
        assert f"{second.name()}.ok" in pool.volumes
    finally:
        hold.set()
        uploader.join(10)
    assert first[0].data == image.read_bytes() and first[0].name() in pool.volumes
    # A later run takes a complete one, uploading nothing.
    again = backend.upload_image(_UploadConn(threading.Event()), pool, image, tmp_path / "c")
    assert again.name() in {first[0].name(), second.name()} and pool.deleted == []


def test_uploads_a_dead_run_left_unfinished_are_reaped(tmp_path):
    """An upload of this machine whose process is gone and whose marker never came is
    deleted; complete uploads, and other machines' or live processes', stay."""
    libvirt = pytest.importorskip("libvirt")
    from pytest_kvm.backends.libvirt import storage as backend

    pool = _Pool(libvirt)
    pool.name = lambda: "pytest-kvm"
    pool.connect = lambda: _UploadConn()
    tag, dead, alive = backend.HOST_TAG, 2**22 + 12345, os.getpid()
    digest = "a868962514df6e667804"
    names = [
        f"img-{digest}.up-h{tag}.p{dead}.0a1b2c3d.qcow2",  # unfinished, owner gone
        f"img-{digest}.up-h{tag}.p{dead}.99887766.qcow2",  # complete
        f"img-{digest}.up-h{tag}.p{dead}.99887766.qcow2.ok",
        f"img-{digest}.up-h{tag}.p{alive}.0d0e0f00.qcow2",  # still uploading
        f"img-{digest}.up-h{'0' if tag != '000000' else '1'}00000.p{dead}.01.qcow2",  # elsewhere
    ]
    for name in names:
        pool.volumes[name] = _Vol(pool, name)
    assert backend.reap_orphan_volumes(pool) == [names[0]]
    assert sorted(pool.volumes) == sorted(names[1:])


class _CapsConn:
    """A hypervisor's connection as ``template_identity`` asks it; ``kvm``: whether
    its domain capabilities offer KVM for x86_64 q35 guests."""

    def __init__(self, libvirt, kvm: bool) -> None:
        self._libvirt, self.kvm, self.asked = libvirt, kvm, 0

    def getHostname(self):
        return "hv.example"

    def getLibVersion(self):
        return 9_000_000

    def getVersion(self):
        return 7_002_000

    def getDomainCapabilities(self, emulator, arch, machine, virttype, flags):
        self.asked += 1
        assert (arch, machine, virttype) == ("x86_64", "q35", "kvm")
        if not self.kvm:
            raise self._libvirt.libvirtError("invalid argument: KVM is not supported")
        return "<domainCapabilities/>"


def _identity(monkeypatch, uri: str, accel: str, kvm: bool) -> tuple[dict, _CapsConn]:
    libvirt = pytest.importorskip("libvirt")
    from pytest_kvm.backends.libvirt import backend as module
    from pytest_kvm.config import Settings

    conn = _CapsConn(libvirt, kvm)
    monkeypatch.setattr(module, "connect", lambda _uri: conn)
    runner = module.LibvirtBackend(Settings(backend="libvirt", uri=uri, accel=accel))
    return runner.template_identity(), conn


def test_template_key_has_the_domain_type_a_remote_host_decides(monkeypatch, tmp_path):
    """On a remote host under --kvm-accel auto the domain type is that host's (its
    domain capabilities): templates made under TCG and under KVM never share a key."""
    import subprocess

    from pytest_kvm.images import Image
    from pytest_kvm.template import Shape, template_key

    remote = "qemu+ssh://root@hv.example/system"
    with_kvm, conn = _identity(monkeypatch, remote, "auto", kvm=True)
    without, _ = _identity(monkeypatch, remote, "auto", kvm=False)
    assert with_kvm["domain_type"] == "kvm" and without["domain_type"] == "qemu"
    path = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True)
    image = Image("base", path, "qcow2", str(path))
    # Our own accelerator (the key's "accel") is the same: only the host's answer differs.
    keys = {template_key(image, Shape(1024, 2), "tcg", "Q", i) for i in (with_kvm, without)}
    assert len(keys) == 2
    assert conn.asked == 1  # asked once, however many templates a run looks up


@pytest.mark.parametrize(
    ("uri", "accel"),
    [
        ("qemu:///system", "auto"),  # local: our own probe decides, as the key says
        ("qemu:///session", "tcg"),
        ("qemu+ssh://root@hv.example/system", "tcg"),  # said: ours, already in the key
        ("qemu+ssh://root@hv.example/system", "kvm"),
    ],
)
def test_template_key_stays_as_it_was_where_our_accelerator_decides(monkeypatch, uri, accel):
    for kvm in (True, False):
        identity, conn = _identity(monkeypatch, uri, accel, kvm=kvm)
        # The fields (so the key) of templates made before the domain type was asked.
        assert identity == {
            "backend": "libvirt",
            "host": "hv.example",
            "libvirt": 9_000_000,
            "hypervisor": 7_002_000,
        }
        assert conn.asked == 0
