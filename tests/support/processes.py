"""Processes for tests: QEMU processes found by what their command line says, and
a process that has exited (a dead lease owner), and the end of a forked child."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def qemu_pids(needle: str) -> list[int]:
    """PIDs of qemu-system processes whose command line contains ``needle``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and b"qemu-system" in argv[0] and needle.encode() in b" ".join(argv):
            pids.append(int(entry.name))
    return pids


def qemu_pids_under(directory: Path) -> list[int]:
    """PIDs of qemu processes whose command line mentions ``directory``."""
    return qemu_pids(str(directory))


def dead_pid() -> tuple[int, int | None]:
    """The PID and start time of a process that has exited: a lease's owner that died."""
    import subprocess
    import sys

    from pytest_kvm.reaper import process_start

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    start = process_start(proc.pid)
    proc.wait()
    return proc.pid, start


def child_exit_code(pid: int, timeout: float, poll: float = 0.05) -> int | None:
    """The exit code of a child made by ``os.fork``, or None if it had not ended
    within ``timeout`` seconds (it is then killed and reaped)."""
    deadline = time.monotonic() + timeout
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None
        time.sleep(poll)
    return os.waitstatus_to_exitcode(done[1])
