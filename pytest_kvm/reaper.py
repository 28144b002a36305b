"""Leases of running guests, and cleanup of what dead runs left.

Every pytest process that uses guests writes a *run lease* (its private dirs) and,
before each guest starts, a *guest lease* (its dirs, QEMU's PID, libvirt domain, tap
device, a TPM guest's swtpm PID) into one directory private to the user. The owner
is recorded as PID plus the process's start time, so a reused PID is not mistaken for
a live run, and with its host name, boot id and PID namespace: a lease written
elsewhere (another host or container sharing /tmp or ``PYTEST_KVM_LEASE_DIR``) names
PIDs that mean nothing here, so it is never reaped, only reported. A lease is removed
once what it names is gone. ``qemu-nbd`` processes (encrypted disks opened offline)
have leases too.

Whatever kills a run (SIGKILL of pytest or of one xdist worker), QEMU dies with its
parent (parent-death signal, see spawn.py) and libvirt destroys its domains
(AUTODESTROY); what is left are files: the run's dirs, sockets and overlays. ``reap``
removes them, and kills any process a lease names that is still there (a guest kept
by ``--kvm-keep-on-failure``, or one started without the parent-death signal, and
its swtpm). Leases
whose owner is alive are never touched. Every run reaps once when it first starts a
guest; ``pytest-kvm reap`` does it by hand, and also removes kept guests.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout

from .backends import TABLE, backend_class
from .lease import LEASE_DIR_ENV as LEASE_DIR_ENV
from .lease import Lease as Lease
from .lease import here as here
from .lease import lease_dir as lease_dir
from .lease import leases as leases
from .lease import owner_fields as owner_fields
from .util import process_alive, process_argv
from .util import process_start as process_start  # re-exported: callers import it here


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
        _kill(pid, start)
        done.append(f"killed {'qemu-nbd' if lease.kind == 'nbd' else 'QEMU'} {pid}")
    # The guest's swtpm (tpm=True), after its QEMU.
    pid, start = data.get("tpm_pid"), data.get("tpm_start")
    if pid and process_alive(pid, start) and _is_our_swtpm(pid, lease):
        _kill(pid, start)
        done.append(f"killed swtpm {pid}")
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


def _kill(pid: int, start: int | None) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while process_alive(pid, start) and time.monotonic() < deadline:
        time.sleep(0.05)


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


def _is_our_swtpm(pid: int, lease: Lease) -> bool:
    """Whether ``pid`` is still the swtpm of the lease's guest: its state dir is in the
    guest's workdir."""
    argv = process_argv(pid)
    workdir = str(lease.data.get("workdir") or "")
    if argv is None or not workdir or not argv[0].endswith(b"swtpm"):
        return False
    return any(arg.startswith(f"dir={workdir}/".encode()) for arg in argv)
