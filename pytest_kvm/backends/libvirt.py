"""The libvirt backend: guests as transient libvirt domains, local or remote.

Everything goes through the libvirt API, so a local ``qemu:///system`` and a remote
``qemu+ssh://host/system`` take the same path:

- The guest's base image is uploaded once per host into a storage pool (a volume
  named by the image's checksum, completed by a marker volume), and the guest's
  overlay (created locally, tiny) is uploaded next to it, rebased onto that volume.
- The domain is created with ``createXML`` paused and auto-destroyed when our
  connection closes (also when this process dies), its console is opened as a
  libvirt stream and copied into the guest's local serial log, then it runs.
- QMP commands go through ``qemuMonitorCommand`` and guest-agent commands through
  ``qemuAgentCommand``; SSH is forwarded to 127.0.0.1 on the hypervisor's host
  with the user network's ``hostfwd_add``.

Lifecycle like the qemu backend's: the constructor records, ``start()`` acts,
``close()`` is idempotent and removes the domain and the guest's volumes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from filelock import FileLock

from ..console import tail
from ..errors import GuestLaunchError, ImageError, KvmConfigError, KvmUnavailable
from ..images.overlay import image_info, qemu_img
from ..network import pid_alive
from ..private import private_dir, read_regular, write_private
from ..qga import AgentCalls, GuestAgentError
from ..ssh import SshJump
from .base import Backend, Labels, Machine, MachineSpec, QmpError

if TYPE_CHECKING:
    from ..config import Settings

METADATA_NS = "https://github.com/pytest-kvm/pytest-kvm/ns/1"
DEFAULT_POOL = "pytest-kvm"
_USER_NETDEV = "hostnet0"  # libvirt's id for the first <interface>'s netdev
DESTROY_WAIT = 60.0  # s for a destroy: libvirt's own SIGTERM, SIGKILL and job waits fit
# A keepalive probe every 5 s, the link dead after 5 unanswered: calls on a dead
# connection (a qemu+ssh link gone quiet, a stopped daemon) fail in about 30 s, and
# a daemon slow under load (its domains die with our connection) has the time.
KEEPALIVE = (5, 5)


def load_libvirt() -> tuple[ModuleType, ModuleType]:
    """``libvirt`` and ``libvirt_qemu``, or KvmUnavailable naming what to install."""
    try:
        import libvirt
        import libvirt_qemu
    except ImportError:
        raise KvmUnavailable(
            "the libvirt backend needs libvirt-python (pip install libvirt-python; "
            "building it needs Debian's libvirt-dev, pkg-config and gcc)"
        ) from None
    return libvirt, libvirt_qemu


def _quiet_errors(libvirt: ModuleType) -> None:
    # libvirt prints every error to stderr by default; we raise them instead.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


def is_remote(uri: str) -> bool:
    """Whether ``uri`` reaches another host (a transport or a host name)."""
    parsed = urllib.parse.urlsplit(uri)
    transport = parsed.scheme.partition("+")[2]
    return bool(parsed.hostname) or transport not in ("", "unix")


SSH_TRANSPORTS = ("ssh", "libssh", "libssh2")


def remote_problem(uri: str) -> str:
    """ "" if guests on ``uri`` can be reached, else why not: a remote hypervisor is
    reached through its host's SSH, so its URI must use an SSH transport."""
    if not is_remote(uri):
        return ""
    parsed = urllib.parse.urlsplit(uri)
    if parsed.scheme.partition("+")[2] not in SSH_TRANSPORTS:
        return (
            f"--kvm-uri {uri}: guests on a remote hypervisor are reached through its "
            "host's SSH; use qemu+ssh://USER@HOST/system"
        )
    return ""


_jumps: dict[str, SshJump] = {}


def jump_for(uri: str) -> SshJump | None:
    """The SSH connection to ``uri``'s host (one per URI and process), or None for a
    local hypervisor, whose guests' forwards are on our own 127.0.0.1."""
    if not is_remote(uri):
        return None
    with _connections_lock:
        if uri not in _jumps:
            parsed = urllib.parse.urlsplit(uri)
            assert parsed.hostname is not None
            _jumps[uri] = SshJump(parsed.username, parsed.hostname, parsed.port)
        return _jumps[uri]


# -- connections --------------------------------------------------------------------


_connections: dict[str, Any] = {}
_connections_lock = threading.Lock()
_event_loop: list[threading.Thread] = []
_event_loop_lock = threading.Lock()


def ensure_event_loop() -> None:
    """libvirt's default event loop on a thread of its own, once per process, before
    the first connection: it drives connections' sockets in the background, which
    non-blocking streams (the console) and keepalive need."""
    libvirt, _ = load_libvirt()
    with _event_loop_lock:
        if _event_loop:
            return
        libvirt.virEventRegisterDefaultImpl()
        thread = threading.Thread(target=_run_events, args=(libvirt,), name="libvirt-events",
                                  daemon=True)  # fmt: skip
        thread.start()
        _event_loop.append(thread)


def open_connection(uri: str) -> Any:
    """A new libvirt connection (libvirtError if it cannot be had), with keepalive
    where its driver has it (the remote one: every daemon's; not the built-in test
    driver)."""
    libvirt, _ = load_libvirt()
    ensure_event_loop()
    conn = libvirt.open(uri)
    with contextlib.suppress(libvirt.libvirtError):
        conn.setKeepAlive(*KEEPALIVE)
    return conn


def _run_events(libvirt: ModuleType) -> None:
    while True:
        if libvirt.virEventRunDefaultImpl() < 0:
            time.sleep(0.1)


def connect(uri: str) -> Any:
    """One libvirt connection per URI and process, checked to be a QEMU hypervisor.

    Every failure is a KvmConfigError naming the URI and saying why."""
    libvirt, _ = load_libvirt()
    with _connections_lock:
        conn = _connections.get(uri)
        if conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                if conn.isAlive():
                    return conn
        _quiet_errors(libvirt)
        try:
            conn = open_connection(uri)
        except libvirt.libvirtError as exc:
            raise KvmConfigError(_connect_message(uri, exc)) from None
        try:
            kind = conn.getType()
        except libvirt.libvirtError as exc:
            conn.close()
            raise KvmConfigError(f"--kvm-uri {uri}: {_first_line(exc)}") from None
        if kind != "QEMU":
            conn.close()
            raise KvmConfigError(
                f"--kvm-uri {uri}: that hypervisor is {kind}, not QEMU; pytest-kvm runs "
                "QEMU guests (use qemu:///system, qemu:///session or qemu+ssh://HOST/system)"
            )
        _connections[uri] = conn
        return conn


def forget_connection(uri: str, conn: Any) -> None:
    """Stop handing out ``conn`` (a call on it did not return): later guests get a new
    connection. It is not closed, as closing could block as well; its auto-destroy
    domains go when this process exits."""
    with _connections_lock:
        if _connections.get(uri) is conn:
            del _connections[uri]


def call_within(seconds: float, call: Callable[[], object]) -> bool:
    """Run a libvirt call that might never return (a stuck client connection or
    daemon) on a thread of its own; True when it returned or raised within seconds."""
    done = threading.Event()

    def run() -> None:
        try:
            call()
        except Exception:  # noqa: S110 - the caller asks only whether it returned
            pass
        finally:
            done.set()

    threading.Thread(target=run, name="libvirt-call", daemon=True).start()
    return done.wait(seconds)


def close_connections() -> None:
    """Close every cached connection: libvirt destroys their auto-destroy domains."""
    with _connections_lock:
        for conn in _connections.values():
            with contextlib.suppress(Exception):
                conn.close()
        _connections.clear()
        for jump in _jumps.values():
            jump.close()
        _jumps.clear()


def _connect_message(uri: str, exc: Exception) -> str:
    text = _first_line(exc)
    lowered = text.lower()
    # Refused by the daemon: file permissions on its socket, or polkit (which needs
    # the system bus to ask) for users outside the libvirt group.
    denied = ("permission denied", "authentication", "polkit", "system bus", "access denied")
    if any(word in lowered for word in denied):
        hint = "you may not use it: run as root, join the 'libvirt' group, or use qemu:///session"
    elif "no such file" in lowered or "connection refused" in lowered:
        hint = "is libvirtd running there? (Debian: libvirt-daemon-system; start libvirtd)"
    elif "no connection driver" in lowered or "unsupported" in lowered:
        hint = "this libvirt has no driver for it (Debian: libvirt-daemon-driver-qemu)"
    else:
        hint = "check the URI, the host and its libvirtd"
    return f"--kvm-uri {uri}: cannot connect ({text}); {hint}"


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


# -- storage ------------------------------------------------------------------------


def check_network(conn: Any, uri: str, name: str) -> None:
    """A libvirt network named ``name`` exists there and is started."""
    libvirt, _ = load_libvirt()
    try:
        net = conn.networkLookupByName(name)
    except libvirt.libvirtError:
        known = ", ".join(sorted(conn.listNetworks() + conn.listDefinedNetworks()))
        raise KvmConfigError(
            f"--kvm-uri {uri}: libvirt network {name!r} does not exist "
            f"(networks there: {known or 'none'})"
        ) from None
    if not net.isActive():
        raise KvmConfigError(
            f"--kvm-uri {uri}: libvirt network {name!r} is not started "
            f"(virsh -c {uri} net-start {name})"
        )


def storage_pool(conn: Any, uri: str, name: str) -> Any:
    """The pool named ``name``, started. Our own default pool is created when missing;
    any other missing pool is an error naming the URI."""
    libvirt, _ = load_libvirt()
    try:
        pool = conn.storagePoolLookupByName(name)
    except libvirt.libvirtError:
        if name != DEFAULT_POOL:
            known = ", ".join(sorted(conn.listStoragePools() + conn.listDefinedStoragePools()))
            raise KvmConfigError(
                f"--kvm-uri {uri}: storage pool {name!r} does not exist "
                f"(pools there: {known or 'none'}); create it or leave --kvm-pool unset"
            ) from None
        pool = _define_default_pool(conn, uri)
    try:
        if not pool.isActive():
            pool.create(0)
        refresh_pool(pool)
    except libvirt.libvirtError as exc:
        raise KvmConfigError(
            f"--kvm-uri {uri}: storage pool {name!r} cannot be started: {_first_line(exc)}"
        ) from None
    return pool


def refresh_pool(pool: Any, wait: float = 120.0) -> None:
    """Re-read the pool's directory. libvirt refuses while any volume of it is being
    uploaded ("has asynchronous jobs running": another worker's overlay): wait for
    that, a refresh only syncs what libvirt knows with the directory."""
    libvirt, _ = load_libvirt()
    deadline = time.monotonic() + wait
    while True:
        try:
            pool.refresh(0)
            return
        except libvirt.libvirtError as exc:
            if "asynchronous jobs" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(0.25)


def _define_default_pool(conn: Any, uri: str) -> Any:
    libvirt, _ = load_libvirt()
    if urllib.parse.urlsplit(uri).path.rstrip("/") == "/session":
        if is_remote(uri):
            raise KvmConfigError(
                f"--kvm-uri {uri}: name a storage pool of that session with --kvm-pool"
            )
        target = Path.home() / ".local/share/libvirt/images" / DEFAULT_POOL
    else:
        target = Path("/var/lib/libvirt/images") / DEFAULT_POOL
    xml = (
        f"<pool type='dir'><name>{DEFAULT_POOL}</name><target><path>{target}</path>"
        "<permissions><mode>0711</mode></permissions></target></pool>"
    )
    try:
        pool = conn.storagePoolDefineXML(xml, 0)
        pool.build(0)
        pool.setAutostart(True)
    except libvirt.libvirtError as exc:
        with contextlib.suppress(libvirt.libvirtError):  # another worker made it
            return conn.storagePoolLookupByName(DEFAULT_POOL)
        raise KvmConfigError(
            f"--kvm-uri {uri}: cannot create storage pool {DEFAULT_POOL!r} at {target}: "
            f"{_first_line(exc)}"
        ) from None
    return pool


def _sums_dir() -> Path | None:
    """The user's private dir of remembered checksums; None (said on stderr) if the
    one in /tmp is not private to this user: it is then not used."""
    path = Path(tempfile.gettempdir()) / f"pytest-kvm-sums-{os.getuid()}"
    try:
        return private_dir(path, "checksum directory")
    except KvmConfigError as exc:
        print(f"pytest-kvm: {exc}; checksums are not remembered", file=sys.stderr)
        return None


def file_sha256(path: Path) -> str:
    """The file's sha256, remembered in a private dir by (path, size, mtime)."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    memos = _sums_dir()
    memo = memos / key.hexdigest()[:32] if memos is not None else None
    if memo is not None:
        with contextlib.suppress(OSError, ValueError):  # none yet, or not ours to trust
            value = read_regular(memo, 64).decode()
            if re.fullmatch("[0-9a-f]{64}", value):
                return value
    digest = hashlib.sha256()
    with path.open("rb") as src:
        while chunk := src.read(1 << 20):
            digest.update(chunk)
    value = digest.hexdigest()
    if memo is not None:
        with contextlib.suppress(OSError):
            write_private(memo, value)
    return value


def _send_file(conn: Any, vol: Any, path: Path) -> None:
    stream = conn.newStream(0)
    size = path.stat().st_size
    vol.upload(stream, 0, size, 0)
    try:
        with path.open("rb") as src:
            stream.sendAll(lambda _stream, nbytes, _src: _src.read(nbytes), src)
        stream.finish()
    except BaseException:
        with contextlib.suppress(Exception):
            stream.abort()
        raise


def _volume_xml(
    name: str,
    capacity: int,
    fmt: str,
    backing: str | None = None,
    backing_format: str = "qcow2",
) -> str:
    root = ET.Element("volume")
    ET.SubElement(root, "name").text = name
    ET.SubElement(root, "capacity").text = str(capacity)
    target = ET.SubElement(root, "target")
    ET.SubElement(target, "format", type=fmt)
    perms = ET.SubElement(target, "permissions")
    ET.SubElement(perms, "mode").text = "0600"
    if backing is not None:
        store = ET.SubElement(root, "backingStore")
        ET.SubElement(store, "path").text = backing
        ET.SubElement(store, "format", type=backing_format)
    return ET.tostring(root, encoding="unicode")


def _lookup(pool: Any, name: str) -> Any | None:
    libvirt, _ = load_libvirt()
    try:
        return pool.storageVolLookupByName(name)
    except libvirt.libvirtError:
        return None


def upload_image(conn: Any, pool: Any, path: Path, lock_dir: Path) -> Any:
    """The pool's volume holding the image at ``path`` (flattened if it has a backing
    chain), uploaded once per host and checksum.

    Every upload goes into a volume of its own (``NAME.up-h<host>.p<pid>.<token>``)
    and is complete only once its marker volume (the same name + ``.ok``) exists,
    which is made after the last byte is in: whoever uploads, from whatever cache or
    host, nobody uses or deletes another's upload before that. Parallel workers of
    this machine upload it once (a file lock); a run on another cache or host that
    finds none complete uploads its own."""
    libvirt, _ = load_libvirt()
    info = image_info(path)
    flatten = bool(info.get("backing-filename")) or info.get("format") != "qcow2"
    prefix = f"{path.stem[:40]}-{file_sha256(path)[:20]}"
    host = hashlib.sha256(conn.getURI().encode()).hexdigest()[:12]
    lock_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock_dir / f"upload-{host}-{prefix}.lock")):
        refresh_pool(pool)
        done = complete_upload(pool, prefix)
        if done is not None:
            return done
        name = f"{prefix}.up-h{_HOST_TAG}.p{os.getpid()}.{secrets.token_hex(4)}.qcow2"
        source = path
        tmpdir: Path | None = None
        vol = None
        try:
            if flatten:
                tmpdir = Path(tempfile.mkdtemp(prefix="pytest-kvm-flat-", dir=lock_dir))
                source = tmpdir / "flat.qcow2"
                proc = qemu_img("convert", "-O", "qcow2", "--", str(path), str(source),
                                timeout=1800)  # fmt: skip
                if proc.returncode != 0:
                    raise ImageError(f"cannot flatten {str(path)!r}: {proc.stderr.strip()}")
            vol = pool.createXML(_volume_xml(name, source.stat().st_size, "qcow2"), 0)
            _send_file(conn, vol, source)
            pool.createXML(_volume_xml(name + ".ok", 0, "raw"), 0)  # now complete
        except BaseException:
            if vol is not None:  # ours, never used: gone
                with contextlib.suppress(libvirt.libvirtError):
                    vol.delete(0)
            raise
        finally:
            if tmpdir is not None:
                shutil.rmtree(tmpdir, ignore_errors=True)
        return pool.storageVolLookupByName(name)


def complete_upload(pool: Any, prefix: str) -> Any | None:
    """A complete upload of the image named ``prefix`` (name + checksum) in ``pool``:
    a volume whose ``.ok`` marker exists (the first by name), else None."""
    names = {vol.name() for vol in pool.listAllVolumes(0)}
    for name in sorted(names):
        ours = name == f"{prefix}.qcow2" or (name.startswith(f"{prefix}.up-") and
                                             name.endswith(".qcow2"))  # fmt: skip
        if ours and f"{name}.ok" in names:
            found = _lookup(pool, name)
            if found is not None:
                return found
    return None


_HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]
_VOLUME = re.compile(r"^pytest-kvm-.+\.h([0-9a-f]{6})\.p(\d+)\.\d+\.[a-z0-9]+$")
_UPLOAD = re.compile(r"^.+-[0-9a-f]{20}\.up-h([0-9a-f]{6})\.p(\d+)\.[0-9a-f]+\.qcow2$")
_reaped: set[str] = set()


def volume_name(domain_name: str, index: int, fmt: str) -> str:
    """A guest's volume: its domain, this machine and process, the drive's index. The
    owner in the name lets a later run on this machine remove what a killed run left."""
    return f"{domain_name}.h{_HOST_TAG}.p{os.getpid()}.{index}.{fmt}"


def reap_orphan_volumes(pool: Any) -> list[str]:
    """Delete guest volumes in ``pool`` left by runs of this machine whose process is
    gone (their domains died with their connections), and their image uploads that
    never completed (no ``.ok`` marker). Once per pool and process; returns the
    names deleted."""
    libvirt, _ = load_libvirt()
    key = f"{pool.connect().getURI()}#{pool.name()}"
    if key in _reaped:
        return []
    _reaped.add(key)
    gone = []
    volumes = pool.listAllVolumes(0)
    names = {vol.name() for vol in volumes}
    for vol in volumes:
        match = _VOLUME.match(vol.name()) or _UPLOAD.match(vol.name())
        if match is None or match.group(1) != _HOST_TAG or pid_alive(int(match.group(2))):
            continue
        if f"{vol.name()}.ok" in names:  # a complete upload: the image others use
            continue
        with contextlib.suppress(libvirt.libvirtError):
            vol.delete(0)
            gone.append(vol.name())
    return gone


# -- the domain ---------------------------------------------------------------------

# What the libvirt backend cannot do yet, and the one message refusing each
# (``LibvirtBackend.refusal``; the machine and the domain XML raise them too).
REFUSALS = {
    "templates": "templates are not supported on the libvirt backend yet",
    "encrypted images": "encrypted images are not supported on the libvirt backend yet",
    "vlans and bridges": "vlans and bridges are not supported on the libvirt backend yet",
    "kernel_args": "kernel_args (direct kernel boot) is not supported on libvirt yet",
}


@dataclass(frozen=True)
class LibvirtTarget:
    """Where and as whom a guest runs on libvirt."""

    uri: str
    pool: str = DEFAULT_POOL
    labels: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    lock_dir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()) / "pytest-kvm-locks")
    # --kvm-accel as given: "auto" on a remote host trusts its domain capabilities.
    accel: str = "auto"


def domain_xml(
    spec: MachineSpec,
    domain_name: str,
    domain_type: str,
    disks: list[tuple[str, str, str, str]],
    labels: tuple[tuple[str, str], ...] = (),
) -> str:
    """The transient domain for ``spec``. ``disks``: (pool, volume, format, device)."""
    ET.register_namespace("pytestkvm", METADATA_NS)
    root = ET.Element("domain", type=domain_type)
    ET.SubElement(root, "name").text = domain_name
    ET.SubElement(root, "genid")  # a new VM generation ID every start
    meta = ET.SubElement(root, "metadata")
    owner = ET.SubElement(meta, f"{{{METADATA_NS}}}owner")
    for key, value in labels:
        owner.set(key, value)
    ET.SubElement(root, "memory", unit="MiB").text = str(spec.memory)
    ET.SubElement(root, "vcpu").text = str(spec.cpus)
    os_el = ET.SubElement(root, "os")
    ET.SubElement(os_el, "type", arch="x86_64", machine="q35").text = "hvm"
    if spec.kernel is not None:
        raise GuestLaunchError(REFUSALS["kernel_args"])
    ET.SubElement(os_el, "boot", dev="cdrom" if spec.boot == "cdrom" else "hd")
    features = ET.SubElement(root, "features")
    ET.SubElement(features, "acpi")
    # As the qemu backend's -cpu host / -cpu max and -smp N (one socket of N cores).
    # Its -accel tcg,thread=multi is QEMU's default for x86_64 guests on x86_64
    # hosts, which libvirt's plain -accel tcg gets: one TCG thread per vCPU.
    if domain_type == "kvm":
        cpu = ET.SubElement(root, "cpu", mode="host-passthrough")
    else:
        cpu = ET.SubElement(root, "cpu", mode="maximum", match="exact")
    ET.SubElement(cpu, "topology", sockets="1", dies="1", cores=str(spec.cpus), threads="1")
    ET.SubElement(root, "on_poweroff").text = "destroy"
    ET.SubElement(root, "on_reboot").text = "restart"
    ET.SubElement(root, "on_crash").text = "destroy"
    devices = ET.SubElement(root, "devices")
    for index, (pool, volume, fmt, device) in enumerate(disks):
        disk = ET.SubElement(devices, "disk", type="volume", device=device)
        driver = ET.SubElement(disk, "driver", name="qemu", type=fmt)
        ET.SubElement(disk, "source", pool=pool, volume=volume)
        if device == "disk":
            driver.set("cache", "unsafe")
            driver.set("discard", "unmap")
            ET.SubElement(disk, "target", dev=f"vd{chr(ord('a') + index)}", bus="virtio")
        else:
            ET.SubElement(disk, "target", dev=f"sd{chr(ord('a') + index)}", bus="sata")
            ET.SubElement(disk, "readonly")
    kind = spec.network.kind
    if kind == "user":
        nic = ET.SubElement(devices, "interface", type="user")
    elif kind == "libvirt":  # a libvirt network: NAT, DHCP by its dnsmasq
        nic = ET.SubElement(devices, "interface", type="network")
        ET.SubElement(nic, "source", network=spec.network.name)
    elif kind == "bridge":  # an existing bridge on the hypervisor's host
        nic = ET.SubElement(devices, "interface", type="bridge")
        ET.SubElement(nic, "source", bridge=spec.network.name)
    else:
        raise GuestLaunchError(f"network {spec.network} is not supported on libvirt")
    ET.SubElement(nic, "mac", address=spec.mac)
    ET.SubElement(nic, "model", type="virtio")
    serial = ET.SubElement(devices, "serial", type="pty")
    ET.SubElement(serial, "target", port="0")
    console = ET.SubElement(devices, "console", type="pty")
    ET.SubElement(console, "target", type="serial", port="0")
    channel = ET.SubElement(devices, "channel", type="unix")
    ET.SubElement(channel, "target", type="virtio", name="org.qemu.guest_agent.0")
    rng = ET.SubElement(devices, "rng", model="virtio")
    ET.SubElement(rng, "backend", model="random").text = "/dev/urandom"
    if spec.display or spec.vnc:
        video = ET.SubElement(devices, "video")
        ET.SubElement(video, "model", type="vga")
    if spec.vnc:
        # On the hypervisor's 127.0.0.1; libvirt sets the password over the monitor.
        password = (spec.workdir / "vnc-password").read_text().strip()
        graphics = ET.SubElement(
            devices, "graphics", type="vnc", autoport="yes", listen="127.0.0.1", passwd=password
        )
        ET.SubElement(graphics, "listen", type="address", address="127.0.0.1")
    ET.SubElement(devices, "memballoon", model="none")
    return ET.tostring(root, encoding="unicode")


def remote_domain_type(conn: Any) -> str:
    """``kvm`` if the hypervisor's host offers KVM for x86_64 q35 guests, else ``qemu``.

    Our own probe runs here, not there; pass --kvm-accel tcg for a host whose KVM
    cannot run standard guests (a PVM host, say)."""
    libvirt, _ = load_libvirt()
    try:
        conn.getDomainCapabilities(None, "x86_64", "q35", "kvm", 0)
    except libvirt.libvirtError:
        return "qemu"
    return "kvm"


def open_console(uri: str, domain: Any) -> tuple[Any, Any]:
    """The domain's console as a non-blocking stream on a libvirt connection of its
    own: (connection, stream). A thread blocked in a stream read on the connection
    the domain was made on held that connection, and ``destroy`` on it waited
    forever (seen in CI); apart, and never blocking, neither waits on the other."""
    libvirt, _ = load_libvirt()
    conn = open_connection(uri)
    try:
        mine = conn.lookupByUUIDString(domain.UUIDString())
        stream = conn.newStream(libvirt.VIR_STREAM_NONBLOCK)
        mine.openConsole(None, stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
    except BaseException:
        with contextlib.suppress(Exception):
            conn.close()
        raise
    return conn, stream


class _ConsolePump:
    """Copies the domain's console stream (non-blocking, on ``conn``, a connection of
    its own) into the local serial log, and what is written to a local UNIX socket
    (``Console.send``) into the stream."""

    POLL = 0.02  # s between reads of an empty stream

    def __init__(self, conn: Any, stream: Any, log: Path, sock_path: Path) -> None:
        self._conn = conn
        self._stream = stream
        self._log = log.open("ab", buffering=0)
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self._server.bind(str(sock_path))
        finally:
            os.umask(old)
        self._server.listen(4)
        self._sock_path = sock_path
        self._stop = threading.Event()
        self._send_lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, name="libvirt-console", daemon=True)
        self._acceptor = threading.Thread(target=self._accept, name="console-in", daemon=True)
        self._reader.start()
        self._acceptor.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                with self._send_lock:
                    data = self._stream.recv(65536)
            except Exception:
                return
            if data == -2:  # nothing yet
                self._stop.wait(self.POLL)
                continue
            if not data or isinstance(data, int):  # end of stream
                return
            self._log.write(data)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._pass_in, args=(conn,), daemon=True).start()

    def _pass_in(self, conn: socket.socket) -> None:
        with conn:
            while not self._stop.is_set():
                try:
                    data = conn.recv(4096)
                except OSError:
                    return
                if not data:
                    return
                if not self._send(data):
                    return

    def _send(self, data: bytes) -> bool:
        """All of ``data`` into the stream; False once it is gone."""
        while data and not self._stop.is_set():
            try:
                with self._send_lock:
                    sent = self._stream.send(data)
            except Exception:
                return False
            if sent == -2:  # full: later
                self._stop.wait(self.POLL)
                continue
            data = data[sent:]
        return True

    def close(self) -> None:
        """Stop copying, drop the stream and close its connection (neither can block
        the domain's own connection)."""
        if self._stop.is_set():
            return
        self._stop.set()
        with contextlib.suppress(Exception):
            self._server.shutdown(socket.SHUT_RDWR)  # wakes the accept() in _accept
        with contextlib.suppress(Exception):
            self._server.close()
        self._sock_path.unlink(missing_ok=True)
        self._reader.join(5)
        call_within(DESTROY_WAIT, self._stream.abort)
        call_within(DESTROY_WAIT, self._conn.close)
        self._log.close()


class LibvirtAgent(AgentCalls):
    """qemu-ga through libvirt (``qemuAgentCommand``): the GuestAgent interface."""

    def __init__(self, domain: Any) -> None:
        self._domain = domain

    def connect(self, timeout: float) -> None:
        self.execute("guest-ping", timeout=timeout)

    def execute_args(self, command: str, arguments: dict[str, Any], timeout: float = 10.0) -> Any:
        libvirt, libvirt_qemu = load_libvirt()
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        try:
            reply = libvirt_qemu.qemuAgentCommand(
                self._domain, json.dumps(message), max(1, int(timeout)), 0
            )
        except libvirt.libvirtError as exc:
            text = _first_line(exc)
            if "timeout" in text.lower() or "not connected" in text.lower():
                raise TimeoutError(f"{command}: {text}") from None
            raise GuestAgentError(f"{command}: {text}") from None
        return json.loads(reply).get("return")

    def close(self) -> None:
        pass

    def __enter__(self) -> LibvirtAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LibvirtMachine(Machine):
    """One transient libvirt domain."""

    keep_refusal = (
        "libvirt destroys the guests of a connection that closes (AUTODESTROY); "
        "use --kvm-backend qemu to keep one"
    )
    events_note = (
        "no QMP events: on the libvirt backend libvirtd owns the QMP monitor "
        "(see its log, and the domain XML in qemu-argv.txt)"
    )
    primary_netdev = _USER_NETDEV
    disk_is_remote = True
    forwards_ssh_after_start = True
    has_vga = False  # a domain without display=True has no graphics card

    def __init__(self, spec: MachineSpec, target: LibvirtTarget, accel: str) -> None:
        if any(drive.secret is not None for drive in spec.drives):
            raise KvmConfigError(REFUSALS["encrypted images"])
        if spec.ram_file is not None or spec.incoming is not None:
            raise KvmConfigError(REFUSALS["templates"])
        if spec.nics or spec.tap_fd is not None:
            raise KvmConfigError(REFUSALS["vlans and bridges"])
        self.spec = spec
        self.target = target
        self._accel = accel
        self.domain_type = "kvm" if accel == "kvm" else "qemu"
        self.domain_name = f"pytest-kvm-{spec.name}"
        self._conn: Any = None
        self._domain: Any = None
        self._pool: Any = None
        self._volumes: list[Any] = []
        self._pump: _ConsolePump | None = None
        self._xml = ""
        self._closed = False
        self._exit: int | None = None
        self._stuck = False  # a call on self._conn did not return: it is not used again
        self.lost = ""  # why the connection died (keepalive), when it did
        self.peak_rss_kib = 0
        self._sampler: threading.Thread | None = None
        self._sampling = threading.Event()

    # -- start ----------------------------------------------------------------------

    @property
    def argv(self) -> list[str]:
        """The domain XML stands in for a command line here (it goes into failure
        artifacts: the VNC password is blanked, as ``virsh dumpxml`` does)."""
        xml = re.sub(r'\spasswd="[^"]*"', ' passwd="(hidden)"', self._xml)
        return [f"libvirt {self.target.uri} domain {self.domain_name}", xml]

    @property
    def events(self) -> list[dict[str, Any]]:
        return []

    def start(self) -> None:
        if self._conn is not None:
            raise RuntimeError("machine already started")
        libvirt, _ = load_libvirt()
        spec = self.spec
        try:
            self._conn = connect(self.target.uri)
            self._pool = storage_pool(self._conn, self.target.uri, self.target.pool)
            reap_orphan_volumes(self._pool)
            if is_remote(self.target.uri) and self.target.accel == "auto":
                self.domain_type = remote_domain_type(self._conn)
            disks = self._upload_disks()
            self._xml = domain_xml(spec, self.domain_name, self.domain_type, disks,
                                   self.target.labels)  # fmt: skip
            flags = libvirt.VIR_DOMAIN_START_AUTODESTROY | libvirt.VIR_DOMAIN_START_PAUSED
            self._domain = self._conn.createXML(self._xml, flags)
            self._open_console()
            self._domain.resume()
            self._sampling.clear()
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        except KvmConfigError:
            self.close()
            raise
        except BaseException as exc:
            self.close()
            if isinstance(exc, KeyboardInterrupt):
                raise
            detail = _first_line(exc) if isinstance(exc, libvirt.libvirtError) else str(exc)
            raise GuestLaunchError(
                f"guest {spec.name!r}: libvirt ({self.target.uri}) could not start domain "
                f"{self.domain_name}: {detail}",
                argv=self.argv,
                console_tail=tail(spec.serial_log, 20),
            ) from None

    def _open_console(self) -> None:
        conn, stream = open_console(self.target.uri, self._domain)
        self._pump = _ConsolePump(conn, stream, self.spec.serial_log, self.spec.console_socket)

    def _upload_disks(self) -> list[tuple[str, str, str, str]]:
        """Each drive as a volume of the pool: the overlay rebased onto the uploaded
        image, read-only drives (the seed) copied as they are."""
        pool_name = self.target.pool
        disks: list[tuple[str, str, str, str]] = []
        for index, drive in enumerate(self.spec.drives):
            name = volume_name(self.domain_name, index, drive.format)
            stale = _lookup(self._pool, name)
            if stale is not None:
                stale.delete(0)
            if index == 0 and drive.media == "disk":
                info = image_info(drive.path)
                backing = info.get("full-backing-filename") or info.get("backing-filename")
                if not backing:  # an installer's blank disk: uploaded as it is
                    vol = self._pool.createXML(
                        _volume_xml(name, drive.path.stat().st_size, "qcow2"), 0
                    )
                    self._volumes.append(vol)
                    _send_file(self._conn, vol, drive.path)
                    disks.append((pool_name, name, "qcow2", "disk"))
                    continue
                base = upload_image(self._conn, self._pool, Path(backing), self.target.lock_dir)
                upload = drive.path.with_name(drive.path.name + ".libvirt")
                shutil.copyfile(drive.path, upload)
                try:
                    proc = qemu_img("rebase", "-u", "-F", "qcow2", "-b", base.path(), "--",
                                    str(upload))  # fmt: skip
                    if proc.returncode != 0:
                        raise GuestLaunchError(f"cannot rebase the overlay: {proc.stderr.strip()}")
                    vol = self._pool.createXML(
                        _volume_xml(name, upload.stat().st_size, "qcow2", base.path()), 0
                    )
                    self._volumes.append(vol)
                    _send_file(self._conn, vol, upload)
                finally:
                    upload.unlink(missing_ok=True)
                disks.append((pool_name, name, "qcow2", "disk"))
                continue
            vol = self._pool.createXML(
                _volume_xml(name, drive.path.stat().st_size, drive.format), 0
            )
            self._volumes.append(vol)
            _send_file(self._conn, vol, drive.path)
            device = "cdrom" if drive.media == "cdrom" or drive.readonly else "disk"
            disks.append((pool_name, name, drive.format, device))
        return disks

    # -- running --------------------------------------------------------------------

    def _sample(self) -> None:
        while not self._sampling.wait(1.0):
            stats = self.stats()
            if not stats:
                return

    def stats(self) -> dict[str, int]:
        """CPU time (ns), resident memory now and at its peak so far (KiB), bytes
        written to disks, from libvirt's domain statistics; {} once it is gone."""
        libvirt, _ = load_libvirt()
        domain = self._domain
        if domain is None:
            return {}
        flags = (
            libvirt.VIR_DOMAIN_STATS_CPU_TOTAL
            | libvirt.VIR_DOMAIN_STATS_BALLOON
            | libvirt.VIR_DOMAIN_STATS_BLOCK
        )
        try:
            [(_, raw)] = self._conn.domainListGetStats([domain], flags)
        except (libvirt.libvirtError, ValueError):
            return {}
        rss = int(raw.get("balloon.rss", 0))
        self.peak_rss_kib = max(self.peak_rss_kib, rss)
        written = sum(
            int(raw.get(f"block.{i}.wr.bytes", 0)) for i in range(int(raw.get("block.count", 0)))
        )
        return {
            "cpu_time_ns": int(raw.get("cpu.time", 0)),
            "rss_kib": rss,
            "peak_rss_kib": self.peak_rss_kib,
            "disk_written_bytes": written,
        }

    def is_running(self) -> bool:
        libvirt, _ = load_libvirt()
        if self._domain is None or self._exit is not None:
            return False
        try:
            running = bool(self._domain.isActive())
        except libvirt.libvirtError as exc:
            running = False
            if not self._conn.isAlive():  # the link, not the guest, is gone
                self.lost = f"libvirt connection to {self.target.uri} lost: {_first_line(exc)}"
        if not running:
            self._exit = 0
        return running

    def exit_code(self) -> int | None:
        return None if self.is_running() else self._exit

    def qmp(self, command: str, **args: Any) -> Any:
        libvirt, libvirt_qemu = load_libvirt()
        if not self.is_running():
            why = f" ({self.lost})" if self.lost else ""
            raise ConnectionError(f"guest {self.spec.name!r} is not running{why}")
        message: dict[str, Any] = {"execute": command}
        if args:
            message["arguments"] = args
        try:
            reply = json.loads(
                libvirt_qemu.qemuMonitorCommand(self._domain, json.dumps(message), 0)
            )
        except libvirt.libvirtError as exc:
            raise ConnectionError(f"guest {self.spec.name!r}: {_first_line(exc)}") from None
        if "error" in reply:
            error = reply["error"]
            raise QmpError(command, str(error.get("class", "")), str(error.get("desc", error)))
        return reply.get("return")

    def leased_address(self, mac: str) -> str:
        """The IPv4 address a libvirt network's DHCP server leased to ``mac``, or ""."""
        libvirt, _ = load_libvirt()
        if self._domain is None or self.spec.network.kind != "libvirt":
            return ""
        try:
            found = self._domain.interfaceAddresses(
                libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE, 0
            )
        except libvirt.libvirtError:
            return ""
        for info in (found or {}).values():
            if str(info.get("hwaddr", "")).lower() != mac.lower():
                continue
            for addr in info.get("addrs") or []:
                if addr.get("type") == libvirt.VIR_IP_ADDR_TYPE_IPV4:
                    return str(addr["addr"])
        return ""

    def agent(self) -> LibvirtAgent:
        if self._domain is None:
            raise GuestAgentError("the domain is not running")
        return LibvirtAgent(self._domain)

    def wait_for_exit(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.is_running():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def shutdown(self, timeout: float = 30.0) -> None:
        """ACPI power-off, then destroy."""
        libvirt, _ = load_libvirt()
        if not self.is_running():
            return
        with contextlib.suppress(libvirt.libvirtError):
            self._domain.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
            if self.wait_for_exit(timeout):
                return
        self.kill()

    def kill(self) -> None:
        """Destroy the domain. A destroy that does not return within DESTROY_WAIT (a
        stuck libvirt client connection or daemon) is done again on a new connection,
        and this one is dropped."""
        if self._domain is None or self._stuck or not self.is_running():
            return
        if not call_within(DESTROY_WAIT, self._domain.destroy):
            self._stuck = True
            forget_connection(self.target.uri, self._conn)
            self._cleanup_afresh()
        self._exit = -9

    def _cleanup_afresh(self) -> None:
        """Destroy the domain and delete its volumes over a connection of their own."""
        libvirt, _ = load_libvirt()
        names = [vol.name() for vol in self._volumes]
        self._volumes.clear()

        def cleanup() -> None:
            conn = open_connection(self.target.uri)
            try:
                with contextlib.suppress(libvirt.libvirtError):
                    conn.lookupByName(self.domain_name).destroy()
                pool = conn.storagePoolLookupByName(self.target.pool)
                for name in names:
                    with contextlib.suppress(libvirt.libvirtError):
                        pool.storageVolLookupByName(name).delete(0)
            finally:
                conn.close()

        if call_within(DESTROY_WAIT, cleanup):
            message = (f"libvirt did not answer destroy of {self.domain_name} within "
                       f"{DESTROY_WAIT:.0f} s; destroyed it over a new connection")  # fmt: skip
        else:
            message = (f"libvirt ({self.target.uri}) did not destroy {self.domain_name} within "
                       f"{2 * DESTROY_WAIT:.0f} s; remove it with `virsh -c {self.target.uri} "
                       f"destroy {self.domain_name}`")  # fmt: skip
        print(f"pytest-kvm: {message}", file=sys.stderr)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._sampling.set()
        try:
            self.kill()
        finally:
            if self._pump is not None:
                self._pump.close()
            if self._sampler is not None:
                self._sampler.join(5)
            for vol in self._volumes:
                with contextlib.suppress(Exception):
                    vol.delete(0)
            self._volumes.clear()

    def screenshot(self) -> bytes:
        """The display as the image libvirt sends (PPM from QEMU)."""
        libvirt, _ = load_libvirt()
        if self._domain is None:
            raise GuestLaunchError("the domain is not running")
        stream = self._conn.newStream(0)
        chunks: list[bytes] = []
        try:
            self._domain.screenshot(stream, 0, 0)
            stream.recvAll(lambda _s, data, out: out.append(data), chunks)
            stream.finish()
        except libvirt.libvirtError as exc:
            with contextlib.suppress(libvirt.libvirtError):
                stream.abort()
            raise GuestLaunchError(f"screenshot: {_first_line(exc)}") from None
        return b"".join(chunks)

    def lease_fields(self) -> dict[str, object]:
        return {"domain": self.domain_name}

    def prepare_vnc(self, password: str) -> None:
        """The password is in the domain XML already."""

    def fetch_disk(self, dest: Path, backing: Path | None) -> None:
        self.download_overlay(dest, backing)

    def download_overlay(self, dest: Path, backing: Path | None) -> None:
        """Copy the guest's overlay volume back to ``dest``, rebased onto the local
        ``backing`` image (None: a disk of its own), for libguestfs and saving."""
        if not self._volumes:
            raise GuestLaunchError("the guest has no overlay volume")
        vol = self._volumes[0]
        stream = self._conn.newStream(0)
        vol.download(stream, 0, 0, 0)
        tmp = dest.with_name(dest.name + ".download")
        try:
            with tmp.open("wb") as out:
                stream.recvAll(lambda _s, data, _o: _o.write(data), out)
            stream.finish()
            if backing is not None:
                proc = subprocess.run(
                    ["qemu-img", "rebase", "-u", "-F", "qcow2", "-b", str(backing), "--",
                     str(tmp)],
                    capture_output=True, text=True, check=False, timeout=300,
                )  # fmt: skip
                if proc.returncode != 0:
                    raise GuestLaunchError(f"cannot rebase the downloaded overlay: {proc.stderr}")
            tmp.replace(dest)
        finally:
            tmp.unlink(missing_ok=True)


class LibvirtBackend(Backend):
    """Guests as transient libvirt domains on ``settings.uri``, their disks in
    ``settings.pool`` (our own one by default)."""

    name = "libvirt"
    refusals = REFUSALS

    def _settings(self) -> Settings:
        if self.settings is None:
            raise KvmConfigError("the libvirt backend needs its target (URI and pool)")
        return self.settings

    @property
    def uri(self) -> str:
        return self._settings().uri

    def check(self) -> None:
        """Connect to the URI, find its network and pool (clear errors naming the
        URI), and delete what runs killed on this machine left in the pool."""
        settings = self._settings()
        uri = settings.uri
        problem = remote_problem(uri)
        if problem:
            raise KvmConfigError(problem)
        conn = connect(uri)
        if settings.network.kind == "libvirt":
            check_network(conn, uri, settings.network.name)
        pool = storage_pool(conn, uri, settings.pool or DEFAULT_POOL)
        reap_orphan_volumes(pool)

    def target(self, labels: Labels = ()) -> LibvirtTarget:
        """Where and as whom a guest with these owner labels runs."""
        settings = self._settings()
        return LibvirtTarget(settings.uri, settings.pool or DEFAULT_POOL, labels,
                             settings.cache / "locks", settings.accel)  # fmt: skip

    def machine(
        self,
        spec: MachineSpec,
        *,
        on_spawn: Callable[[int], None] | None = None,
        labels: Labels = (),
    ) -> LibvirtMachine:
        # No on_spawn: QEMU runs under libvirtd, which ends it (AUTODESTROY).
        return LibvirtMachine(spec, self.target(labels), spec.accel)

    def jump(self) -> SshJump | None:
        return jump_for(self.uri)

    @classmethod
    def reap(cls, lease: Mapping[str, Any]) -> list[str]:
        domain = lease.get("domain")
        if not domain:
            return []
        return destroy_leased_domain(str(lease.get("uri", "")), str(domain), lease)

    def close(self) -> None:
        close_connections()


def domain_is_the_leases(xml: str, data: Mapping[str, Any]) -> bool:
    """Whether a domain's owner labels (see plugin.py) name the lease's run, process and
    host: a run id alone may be another run's, on another host or after a reboot."""
    try:
        root = ET.fromstring(xml)  # noqa: S314 (libvirtd's own output of a parsed domain)
        owner = root.find(f"metadata/{{{METADATA_NS}}}owner")
    except ET.ParseError:
        return False
    want = {"run": data.get("run_id"), "pid": data.get("pid"), "host": data.get("host")}
    return owner is not None and all(
        value is not None and owner.get(key) == str(value) for key, value in want.items()
    )


def destroy_leased_domain(uri: str, domain: str, data: Mapping[str, Any]) -> list[str]:
    """Destroy a libvirt domain a dead run left (one created without AUTODESTROY)."""
    try:
        libvirt, _ = load_libvirt()
        conn = connect(uri)
    except Exception:  # no libvirt here, or its daemon is gone: nothing to do
        return []
    try:
        dom = conn.lookupByName(domain)
    except libvirt.libvirtError:
        return []
    try:
        if not domain_is_the_leases(dom.XMLDesc(0), data):
            return []  # not the domain this lease made
        dom.destroy()
    except libvirt.libvirtError:
        return []
    return [f"destroyed domain {domain}"]


BACKEND = LibvirtBackend
