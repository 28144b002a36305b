"""Small real qcow2 files and file hashes."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path


def make_qcow2(path: Path, size: str = "16M", data_kib: int = 0, pattern: int = 0x5A) -> Path:
    """A real qcow2 of virtual ``size``; with ``data_kib``, that many KiB of byte
    ``pattern`` written (a few hundred KiB on disk)."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    if data_kib:
        subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern:#x} 0 {data_kib}k", str(path)],
            check=True,
            capture_output=True,
        )
    return path


def qcow2_bytes(path: Path, data_kib: int = 640, pattern: int = 0x5A) -> bytes:
    """``make_qcow2`` with data, as the bytes a server hands out."""
    return make_qcow2(path, data_kib=data_kib, pattern=pattern).read_bytes()


def sha256(path: Path) -> str:
    """The hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
