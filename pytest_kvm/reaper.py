"""Leases of running guests, and cleanup of what dead runs left.

Every pytest process that uses guests writes a *run lease* (its private dirs) and,
before each guest starts, a *guest lease* (its dirs, QEMU's PID, libvirt domain, tap
device) into one directory private to the user. The owner is recorded as PID plus
the process's start time, so a reused PID is not mistaken for a live run, and with
its host name, boot id and PID namespace: a lease written elsewhere (another host or
container sharing /tmp or ``PYTEST_KVM_LEASE_DIR``) names PIDs that mean nothing
here, so it is never reaped, only reported. A lease is removed once what it names
is gone. ``qemu-nbd`` processes (encrypted disks opened offline) have leases too.

Whatever kills a run (SIGKILL of pytest or of one xdist worker), QEMU dies with its
parent (parent-death signal, see spawn.py) and libvirt destroys its domains
(AUTODESTROY); what is left are files: the run's dirs, sockets and overlays. ``reap``
removes them, and kills any process a lease names that is still there (a guest kept
by ``--kvm-keep-on-failure``, or one started without the parent-death signal). Leases
whose owner is alive are never touched. Every run reaps once when it first starts a
guest; ``pytest-kvm reap`` does it by hand, and also removes kept guests.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from .private import private_dir, read_regular, write_private
from .util import boot_id, pid_namespace, process_alive, process_argv
from .util import process_start as process_start  # re-exported: callers import it here

LEASE_DIR_ENV = "PYTEST_KVM_LEASE_DIR"


def lease_dir() -> Path:
    """The user's lease directory (0700, owned by the user), made on first use."""
    configured = os.environ.get(LEASE_DIR_ENV)
    path = (
        Path(configured)
        if configured
        else Path(tempfile.gettempdir()) / f"pytest-kvm-leases-{os.getuid()}"
    )
    return private_dir(
        path, "lease directory", parents=bool(configured), fix=f"remove it or set {LEASE_DIR_ENV}"
    )


def here() -> dict[str, str]:
    """Where this process's PIDs mean something: host, boot and PID namespace."""
    return {"host": socket.gethostname(), "boot_id": boot_id(), "pidns": pid_namespace()}


def owner_fields() -> dict[str, Any]:
    pid = os.getpid()
    return {
        "pid": pid,
        "pid_start": process_start(pid),
        **here(),
        "created": time.time(),
    }


@dataclass
class Lease:
    """One lease file; ``update`` rewrites it atomically, ``remove`` deletes it."""

    path: Path
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def create(cls, directory: Path, stem: str, data: dict[str, Any]) -> Lease:
        lease = cls(directory / f"{stem}.json", dict(data))
        lease._write()
        return lease

    @classmethod
    def load(cls, path: Path) -> Lease | None:
        try:
            data = json.loads(read_regular(path))
        except (OSError, ValueError):
            return None
        return cls(path, data) if isinstance(data, dict) else None

    def _write(self) -> None:
        write_private(self.path, json.dumps(self.data, indent=1, sort_keys=True))

    def update(self, **fields: Any) -> None:
        self.data.update(fields)
        if self.path.exists():
            self._write()

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    @property
    def foreign(self) -> str:
        """Why this lease's PIDs cannot be judged here ("" if they can): it was written
        on another host, in another boot or in another PID namespace (a container
        sharing /tmp or the lease directory). Fields a lease lacks are not compared."""
        for key, value in here().items():
            theirs = self.data.get(key)
            if theirs is not None and theirs != value:
                return f"written with {key} {theirs}, this is {value or '?'}"
        return ""

    @property
    def owner_alive(self) -> bool:
        """Whether the run that wrote it may still be alive: a foreign lease always may."""
        if self.foreign:
            return True
        return process_alive(self.data.get("pid"), self.data.get("pid_start"))

    @property
    def kept(self) -> bool:
        return bool(self.data.get("kept"))

    @property
    def kind(self) -> str:
        return str(self.data.get("kind", ""))

    def describe(self) -> str:
        data = self.data
        what = data.get("name") or data.get("run_id", "?")
        return f"{self.kind} {what} (run {data.get('run_id', '?')}, pid {data.get('pid')})"


def leases(directory: Path | None = None) -> list[Lease]:
    directory = directory or lease_dir()
    found = []
    for path in sorted(directory.glob("*.json")):
        lease = Lease.load(path)
        if lease is not None:
            found.append(lease)
    return found


@dataclass
class ReapResult:
    reaped: list[str] = field(default_factory=list)  # what was removed, a line each
    kept: list[str] = field(default_factory=list)  # kept guests left alone
    foreign: list[str] = field(default_factory=list)  # other hosts' leases, left alone
    busy: bool = False  # another process was reaping


def reap(
    include_kept: bool = False,
    directory: Path | None = None,
    progress: Callable[[str], None] | None = None,
    select: Callable[[Lease], bool] | None = None,
) -> ReapResult:
    """Clean up after every run whose process is gone; returns what was done.

    Guests kept by ``--kvm-keep-on-failure`` are left running unless ``include_kept``;
    ``select`` limits reaping to the leases it accepts.
    """
    directory = directory or lease_dir()
    result = ReapResult()
    try:
        lock = FileLock(str(directory / ".reap.lock"), timeout=0)
        lock.acquire()
    except Timeout:
        result.busy = True  # somebody is reaping right now; they will do it
        return result
    try:
        found = leases(directory)
        # Guests first: a kept run's dirs hold its kept guests' keys.
        for lease in sorted(found, key=lambda item: item.kind != "guest"):
            if select is not None and not select(lease):
                continue
            if lease.foreign:  # its PIDs are another machine's: never judged here
                result.foreign.append(f"{lease.describe()}: {lease.foreign}")
                continue
            if lease.owner_alive:
                continue
            if lease.kept and not include_kept:
                result.kept.append(lease.describe())
                continue
            done = _reap_one(lease)
            result.reaped.append(f"{lease.describe()}: {', '.join(done) or 'lease only'}")
            if progress is not None:
                progress(f"pytest-kvm: reaped {result.reaped[-1]}")
    finally:
        lock.release()
    return result


def _reap_one(lease: Lease) -> list[str]:
    data = lease.data
    done: list[str] = []
    pid, start = data.get("qemu_pid"), data.get("qemu_start")
    if pid and process_alive(pid, start) and _is_our_process(pid, lease):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while process_alive(pid, start) and time.monotonic() < deadline:
            time.sleep(0.05)
        done.append(f"killed {'qemu-nbd' if lease.kind == 'nbd' else 'QEMU'} {pid}")
    domain = data.get("domain")
    if domain:
        done += _destroy_domain(str(data.get("uri", "")), str(domain), data)
    tap = data.get("tap")
    if tap and Path("/sys/class/net", str(tap)).exists():
        run = subprocess.run(["ip", "link", "del", "dev", str(tap)], capture_output=True)
        if run.returncode == 0:
            done.append(f"deleted tap {tap}")
    for key in ("workdir", "sockdir", "dir", "sock_dir"):
        value = data.get(key)
        if value and _ours(Path(value)) and Path(value).exists():
            shutil.rmtree(value, ignore_errors=True)
            done.append(f"removed {value}")
    lease.remove()
    return done


def _ours(path: Path) -> bool:
    """Only directories this tool makes are removed, whatever a lease file says."""
    return path.is_absolute() and (
        path.name.startswith("pytest-kvm-")
        or path.name.startswith("kvm-")
        or path.parent.name.startswith("pytest-kvm-")
    )


def _is_our_process(pid: int, lease: Lease) -> bool:
    """Whether ``pid`` is still the process the lease names: QEMU running that guest,
    or qemu-nbd serving on that socket."""
    argv = process_argv(pid)
    if argv is None:
        return False
    if lease.kind == "nbd":
        sock = str(lease.data.get("socket") or "")
        return bool(sock) and argv[0].endswith(b"qemu-nbd") and sock.encode() in argv
    name = str(lease.data.get("name") or "")
    return bool(name) and f"guest={name},".encode() in b"\0".join(argv)


def domain_is_the_leases(xml: str, data: dict[str, Any]) -> bool:
    """Whether a domain's owner labels (see plugin.py) name the lease's run, process and
    host: a run id alone may be another run's, on another host or after a reboot."""
    from .backends.libvirt import METADATA_NS

    try:
        root = ET.fromstring(xml)  # noqa: S314 (libvirtd's own output of a parsed domain)
        owner = root.find(f"metadata/{{{METADATA_NS}}}owner")
    except ET.ParseError:
        return False
    want = {"run": data.get("run_id"), "pid": data.get("pid"), "host": data.get("host")}
    return owner is not None and all(
        value is not None and owner.get(key) == str(value) for key, value in want.items()
    )


def _destroy_domain(uri: str, domain: str, data: dict[str, Any]) -> list[str]:
    """Destroy a libvirt domain a dead run left (one created without AUTODESTROY)."""
    try:
        from .backends.libvirt import connect, load_libvirt

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
