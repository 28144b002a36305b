"""Child processes that die with us: QEMU, qemu-nbd.

Each gets SIGKILL from the kernel when this process dies (the parent-death signal,
set between fork and exec), so a SIGKILL of pytest leaves none of them running.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import os
import signal
import subprocess
from typing import Any

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


# The parent-death signal fires when the *thread* that forked the child ends, not
# only the process. Guests may be started from short-lived threads (a test's thread
# pool), so every such child is forked by this one thread, which lives as long as we do.
def _new_spawner() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="qemu-spawn")


_spawner = _new_spawner()


def _respawner_after_fork() -> None:
    # A child made by os.fork has only the thread that forked: the spawner thread
    # (and its queue's lock, maybe held) stayed in the parent. The child gets its own.
    global _spawner
    _spawner = _new_spawner()


os.register_at_fork(after_in_child=_respawner_after_fork)


def spawn(argv: list[str], die_with_parent: bool = True, **popen: Any) -> subprocess.Popen[bytes]:
    """``subprocess.Popen(argv, **popen)`` that gets SIGKILL when this process dies
    (unless not ``die_with_parent``): for every helper that must not outlive us."""

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            argv, preexec_fn=_die_with_parent if die_with_parent else None, **popen
        )

    return _spawner.submit(start).result()
