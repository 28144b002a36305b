"""A streaming writer of newc cpio archives: the Linux kernel's initramfs format.

The foreign-architecture builder (:mod:`pytest_kvm.images.foreign`) hands a whole
unpacked root directory to a guest kernel as its initramfs, so the writer streams
file contents from disk instead of holding the archive in memory, and keeps
what a root file system needs: owners, modes, times, symlinks, device nodes,
hard links (each link's data is written once: the kernel links entries that
share an inode number and have ``nlink > 1``).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
_COPY_CHUNK = 1 << 20


def header(
    name: str,
    *,
    ino: int,
    mode: int,
    uid: int = 0,
    gid: int = 0,
    nlink: int = 1,
    mtime: int = 0,
    size: int = 0,
    rdev: tuple[int, int] = (0, 0),
) -> bytes:
    """One entry's header and name, padded to 4 bytes (what follows is the data)."""
    encoded = name.encode("utf-8", "surrogateescape") + b"\0"
    fields = (ino, mode, uid, gid, nlink, mtime, size, 0, 0, rdev[0], rdev[1], len(encoded), 0)
    for value in fields:
        if not 0 <= value <= 0xFFFFFFFF:
            raise ValueError(f"cpio entry {name!r}: a field does not fit newc's 32 bits: {value}")
    head = MAGIC + b"".join(b"%08X" % v for v in fields) + encoded
    return head + b"\0" * (-len(head) % 4)


class CpioWriter:
    """Entries appended to ``out`` (a binary file); :meth:`finish` writes the trailer."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.offset = 0
        self._ino = 0
        self._links: dict[tuple[int, int], int] = {}  # (st_dev, st_ino) -> our inode number
        self.entries = 0

    def _write(self, data: bytes) -> None:
        self.out.write(data)
        self.offset += len(data)

    def _pad(self) -> None:
        self._write(b"\0" * (-self.offset % 4))

    def _next_ino(self) -> int:
        self._ino += 1
        return self._ino

    def add_bytes(self, name: str, data: bytes, mode: int = 0o644) -> None:
        """A regular file ``name`` (relative, no leading slash) holding ``data``."""
        self._write(header(name, ino=self._next_ino(), mode=stat.S_IFREG | mode, size=len(data)))
        self._write(data)
        self._pad()
        self.entries += 1

    def add_path(self, name: str, path: Path) -> None:
        """``path`` (not followed if a symlink) as entry ``name``, with its metadata."""
        st = os.lstat(path)
        kind = stat.S_IFMT(st.st_mode)
        mode = st.st_mode
        nlink = 1
        data_path: Path | None = None
        link_target = b""
        rdev = (0, 0)
        if kind == stat.S_IFREG:
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1:
                nlink = st.st_nlink
                if key in self._links:
                    # a further name of an inode already written: no data again
                    self._write(
                        header(
                            name,
                            ino=self._links[key],
                            mode=mode,
                            uid=st.st_uid,
                            gid=st.st_gid,
                            nlink=nlink,
                            mtime=int(st.st_mtime),
                        )
                    )
                    self.entries += 1
                    return
            data_path = path
            ino = self._next_ino()
            if st.st_nlink > 1:
                self._links[key] = ino
            size = st.st_size
        elif kind == stat.S_IFLNK:
            link_target = os.fsencode(os.readlink(path))
            ino, size = self._next_ino(), len(link_target)
        elif kind in (stat.S_IFCHR, stat.S_IFBLK):
            ino, size = self._next_ino(), 0
            rdev = (os.major(st.st_rdev), os.minor(st.st_rdev))
        elif kind in (stat.S_IFDIR, stat.S_IFIFO):
            ino, size = self._next_ino(), 0
        else:  # sockets: nothing a root file system ships
            return
        self._write(
            header(
                name,
                ino=ino,
                mode=mode,
                uid=st.st_uid,
                gid=st.st_gid,
                nlink=nlink,
                mtime=int(st.st_mtime),
                size=size,
                rdev=rdev,
            )
        )
        if link_target:
            self._write(link_target)
        elif data_path is not None:
            copied = 0
            with open(data_path, "rb") as f:
                while chunk := f.read(min(_COPY_CHUNK, size - copied)):
                    self._write(chunk)
                    copied += len(chunk)
                    if copied >= size:
                        break
            if copied != size:
                raise OSError(f"{data_path} changed size while archived ({copied} of {size})")
        self._pad()
        self.entries += 1

    def add_tree(self, root: Path, *, skip: frozenset[str] = frozenset()) -> None:
        """Every entry under ``root``, parents before children, names relative to it.

        ``skip``: relative names left out (with everything under them)."""
        for directory, dirnames, filenames in os.walk(root):
            rel_dir = os.path.relpath(directory, root)
            dirnames.sort()
            kept = []
            for d in dirnames:
                rel = d if rel_dir == "." else f"{rel_dir}/{d}"
                if rel in skip:
                    continue
                self.add_path(rel, Path(directory, d))
                if os.path.islink(os.path.join(directory, d)):
                    continue  # a symlink to a directory: the link only
                kept.append(d)
            dirnames[:] = kept
            for f in sorted(filenames):
                rel = f if rel_dir == "." else f"{rel_dir}/{f}"
                if rel not in skip:
                    self.add_path(rel, Path(directory, f))

    def finish(self) -> None:
        self._write(header(TRAILER, ino=0, mode=0, nlink=1))
        self._write(b"\0" * (-self.offset % 512))
