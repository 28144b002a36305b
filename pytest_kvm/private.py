"""Directories and files private to this user, also in shared places such as /tmp.

Whatever sits in a world-writable directory may have been put there by somebody else
first. So a directory is used only if it is this user's own and closed to everyone
else (0700); files are written under a new name (``O_EXCL|O_NOFOLLOW``) and renamed
into place, so a planted symlink is replaced, never written through; and only regular
files are read (``O_NOFOLLOW|O_NONBLOCK``, then ``fstat``), never a symlink, a FIFO
(whose ``open`` would hang) or a device.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from pathlib import Path

from .errors import KvmConfigError


class NotRegularFile(OSError):
    """A path that should be a regular file is something else (a FIFO, a device)."""


def private_dir(path: Path, what: str, *, parents: bool = False, fix: str = "remove it") -> Path:
    """``path`` as a directory (0700) owned by this user, made if missing; else
    KvmConfigError saying what is wrong and ``fix``, what to do about it."""
    try:
        path.mkdir(mode=0o700, parents=parents, exist_ok=True)
        info = path.lstat()
    except OSError as exc:
        raise KvmConfigError(f"{what} {path}: {exc.strerror or exc}; {fix}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise KvmConfigError(f"{what} {path} is not a directory (a symlink or a file); {fix}")
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        # In a shared /tmp, somebody else may have made it first: never trust it.
        raise KvmConfigError(
            f"{what} {path} is not private to this user (owner uid {info.st_uid}, "
            f"mode {info.st_mode & 0o777:o}); {fix}"
        )
    return path


def read_regular(path: Path, limit: int = 1 << 20) -> bytes:
    """The first ``limit`` bytes of the regular file ``path``. OSError if it is missing
    or a symlink, NotRegularFile if it is anything else but a regular file."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile(errno.EINVAL, "not a regular file", str(path))
        chunks = []
        while limit > 0 and (chunk := os.read(fd, min(limit, 1 << 16))):
            chunks.append(chunk)
            limit -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def write_private(path: Path, data: bytes | str, mode: int = 0o600) -> None:
    """Replace ``path`` whole with ``data``: a new file (``O_EXCL|O_NOFOLLOW``) renamed
    over it, so readers see the old or the new contents and a symlink at ``path`` is
    replaced, not followed."""
    payload = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(payload)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
