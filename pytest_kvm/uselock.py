"""Use locks: files that live runs use (templates they clone from, downloaded images
their overlays are backed by) are marked with a shared ``flock`` on a lock file, held
by every process that uses them until it ends; whoever wants to remove one takes the
lock exclusively without waiting, and leaves the file alone when it cannot.

``filelock.FileLock`` has no shared mode, hence ``fcntl.flock`` here. The locks are
per open file, so they also keep apart two users in one process, and the kernel
drops them when the process dies, however it dies.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_held: dict[str, int] = {}
_guard = threading.Lock()


def _open(lock: Path) -> int:
    return os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def hold(lock: Path) -> None:
    """Mark what ``lock`` stands for as in use by this process, until :func:`release`
    or the end of the process. Waits while someone is removing it; the caller
    checks afterwards that it is still there (or holds a lock that keeps removers out)."""
    key = str(lock)
    with _guard:
        if key in _held:
            return
        fd = _open(lock)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
        except BaseException:
            os.close(fd)
            raise
        _held[key] = fd


def release(lock: Path) -> None:
    """No longer in use by this process (nothing if it was not)."""
    with _guard:
        fd = _held.pop(str(lock), None)
    if fd is not None:
        os.close(fd)  # closing the last descriptor drops the flock


@contextmanager
def unused(lock: Path) -> Iterator[bool]:
    """Whether nobody holds ``lock``; if so, no one can start using it (:func:`hold`
    waits) until the block ends, so the caller may remove what it stands for."""
    fd = _open(lock)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)
