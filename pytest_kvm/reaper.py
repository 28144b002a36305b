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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from .backends import TABLE, backend_class
from .private import private_dir, read_regular, write_private

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


def process_start(pid: int) -> int | None:
    """The start time of process ``pid`` (clock ticks since boot), or None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after it.
    fields = stat[stat.rfind(")") + 2 :].split()
    try:
        return int(fields[19])  # field 22 of the whole line
    except (IndexError, ValueError):
        return None


def process_alive(pid: int | None, start: int | None) -> bool:
    """Whether the process that was ``pid`` when it had start time ``start`` still runs."""
    if not pid:
        return False
    now = process_start(pid)
    if now is None:
        return False
    if start is not None and now != start:
        return False  # the PID was reused
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z"):
            return False  # a zombie: dead, waiting for its parent
    return True


def boot_id() -> str:
    """This kernel's boot identity ("" if unknown): PIDs compare only within one boot."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def pid_namespace() -> str:
    """This process's PID namespace, e.g. ``pid:[4026531836]`` ("" if unknown): two
    containers on one kernel share the boot, not their PIDs."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


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
    # What only the guest's backend can end (a libvirt domain). A lease without a
    # backend name but with a domain is the libvirt backend's.
    backend = str(data.get("backend") or ("libvirt" if data.get("domain") else ""))
    if backend in TABLE:
        done += backend_class(backend).reap(data)
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
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if lease.kind == "nbd":
        sock = str(lease.data.get("socket") or "")
        return bool(sock) and argv[0].endswith(b"qemu-nbd") and sock.encode() in argv
    name = str(lease.data.get("name") or "")
    return bool(name) and f"guest={name},".encode() in b"\0".join(argv)
