"""The kernel, initrd and command line an image's GRUB would boot, for direct kernel boot.

A guest with ``kernel_args`` boots with QEMU's ``-kernel``/``-initrd``/``-append``:
the command line of the image's default GRUB entry plus the test's arguments. The
files are read from the image (read-only) with libguestfs, once per image, and
kept in ``<cache>/kernels/<image>-<identity>/``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from ..errors import ImageError, KvmUnavailable
from ..util import rename_synced
from . import Image

_LINUX = re.compile(r"^\s*linux(?:16|efi)?\s+(\S+)\s*(.*)$", re.MULTILINE)
_INITRD = re.compile(r"^\s*initrd(?:16|efi)?\s+(\S+)", re.MULTILINE)
_GRUB_CFG = ("/boot/grub/grub.cfg", "/boot/grub2/grub.cfg", "/grub/grub.cfg", "/grub2/grub.cfg")


@dataclass(frozen=True)
class BootFiles:
    kernel: Path
    initrd: Path | None
    cmdline: str  # the image's own, without the test's kernel_args


def parse_grub_cfg(text: str) -> tuple[str, str | None, str]:
    """(kernel path, initrd path or None, command line) of the first ``linux`` entry."""
    linux = _LINUX.search(text)
    if linux is None:
        raise ImageError("grub.cfg has no 'linux' line to take the kernel from")
    # The initrd that belongs to that entry: the first one after its linux line.
    initrd = _INITRD.search(text, linux.end())
    return linux.group(1), initrd.group(1) if initrd else None, linux.group(2).strip()


def _identity(image: Image) -> str:
    st = image.path.stat()
    raw = f"{image.path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def boot_files(
    image: Image, cache: Path, force_tcg: bool, progress: Callable[[str], None]
) -> BootFiles:
    """The image's kernel, initrd and command line, read once and cached."""
    root = cache / "kernels"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{image.name}-{_identity(image)}"
    with FileLock(str(root / f".{final.name}.lock")):
        if not (final / "meta.json").exists():
            _extract(image, final, force_tcg, progress)
        meta = json.loads((final / "meta.json").read_text())
    return BootFiles(
        kernel=final / "vmlinuz",
        initrd=final / "initrd.img" if meta["initrd"] else None,
        cmdline=meta["cmdline"],
    )


def _extract(image: Image, final: Path, force_tcg: bool, progress: Callable[[str], None]) -> None:
    try:
        import guestfs  # Debian: python3-guestfs (the venv sees system site packages)
    except ImportError:
        raise KvmUnavailable(
            "kernel_args needs libguestfs' Python binding (Debian package: python3-guestfs)"
        ) from None
    progress(f"pytest-kvm: reading the kernel and GRUB command line from {image.name}")
    work = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(mode=0o700)
    g: Any = guestfs.GuestFS(python_return_dict=True)
    try:
        if force_tcg:  # under a PVM /dev/kvm the appliance would hang for minutes
            g.set_backend_settings(["force_tcg"])
        g.add_drive_opts(str(image.path), readonly=1, format=image.format)
        g.launch()
        roots = g.inspect_os()
        if not roots:
            raise ImageError(f"{image.name}: libguestfs found no operating system in it")
        mounts = g.inspect_get_mountpoints(roots[0])
        for mountpoint in sorted(mounts, key=len):
            with contextlib.suppress(RuntimeError):
                g.mount_ro(mounts[mountpoint], mountpoint)
        cfg = next((p for p in _GRUB_CFG if g.is_file(p)), None)
        if cfg is None:
            raise ImageError(f"{image.name}: no GRUB configuration found ({', '.join(_GRUB_CFG)})")
        kernel, initrd, cmdline = parse_grub_cfg(g.cat(cfg))
        g.download(_resolve(g, kernel), str(work / "vmlinuz"))
        if initrd is not None:
            g.download(_resolve(g, initrd), str(work / "initrd.img"))
        (work / "meta.json").write_text(
            json.dumps({"cmdline": cmdline, "initrd": initrd is not None, "grub_cfg": cfg})
        )
        rename_synced(work, final)
    except RuntimeError as exc:  # libguestfs reports everything as RuntimeError
        raise ImageError(f"{image.name}: reading its kernel with libguestfs: {exc}") from None
    finally:
        with contextlib.suppress(Exception):
            g.shutdown()
        g.close()
        shutil.rmtree(work, ignore_errors=True)


def _resolve(g: Any, path: str) -> str:
    """GRUB paths are relative to the partition GRUB read: ``/vmlinuz`` may be ``/boot/...``."""
    for candidate in (path, "/boot" + path):
        if g.is_file(candidate, followsymlinks=True):
            return str(g.realpath(candidate))
    raise ImageError(f"the kernel or initrd {path!r} named in grub.cfg is not in the image")
