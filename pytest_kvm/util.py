"""Small helpers every layer uses: log tails, file digests, durable renames, the QEMU
path check and process identity. Imports nothing of the project but ``errors``."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path

from .errors import GuestLaunchError

# -- text tails -------------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Za-z0-9]")


def tail(path: Path, lines: int = 30, max_bytes: int = 64 * 1024) -> str:
    """The last ``lines`` lines of a log, decoded leniently, without escape sequences."""
    try:
        with path.open("rb") as log:
            log.seek(0, 2)
            size = log.tell()
            log.seek(max(0, size - max_bytes))
            data = log.read()
    except FileNotFoundError:
        return ""
    text = _ANSI.sub("", data.decode("utf-8", errors="replace")).replace("\r", "")
    return "\n".join(text.splitlines()[-lines:])


def tail_text(text: str, lines: int = 10) -> str:
    """The last ``lines`` lines of ``text``, trailing blank space dropped."""
    return "\n".join(text.rstrip().splitlines()[-lines:])


# -- files ------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file's content, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while block := stream.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's data and metadata to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rename_synced(src: Path, dst: Path) -> None:
    """Rename ``src`` (a file, or a directory of files) to ``dst`` durably: its data is
    on disk before the rename, and the rename is on disk before this returns, so a
    crash leaves the old name or a whole new one, never a name over lost blocks."""
    if src.is_dir():
        for path in src.iterdir():
            if path.is_file() and not path.is_symlink():
                fsync_path(path)
    fsync_path(src)
    os.replace(src, dst)
    fsync_path(dst.parent)


def check_path_for_qemu(path: str) -> None:
    """Refuse a path QEMU's option syntax would split (on ','; '' escapes it)."""
    if "," in path:
        raise GuestLaunchError(f"path {path!r} contains a comma, which QEMU options cannot carry")


# -- processes --------------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    """Whether a process with that PID exists (ours or not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


def process_argv(pid: int) -> list[bytes] | None:
    """Process ``pid``'s command line, or None if it is gone or not ours to read."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None


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


class Background:
    """``target`` running on a daemon thread of its own (started here): for calls
    that may never return. ``wait`` says whether it ended in time; ``join`` returns
    what it raised, or a ``TimeoutError`` while it still runs."""

    def __init__(self, target: Callable[[], object], name: str = "background") -> None:
        self._error: BaseException | None = None
        self._target = target
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._target()
        except BaseException as exc:  # reported by join
            self._error = exc

    def wait(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def join(self, timeout: float) -> BaseException | None:
        if not self.wait(timeout):
            return TimeoutError("still running")
        return self._error
