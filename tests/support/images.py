"""Small real qcow2 files and file hashes."""

from __future__ import annotations

import hashlib
import struct
import subprocess
import zlib
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


def decode_png(data: bytes) -> tuple[int, int, bytes]:
    """Width, height and RGB pixels of a PNG written by ppm_to_png (filter 0 rows)."""
    pos, idat = 8, b""
    width = height = 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        crc = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])[0]
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    rows = [raw[r * (1 + 3 * width) + 1 : (r + 1) * (1 + 3 * width)] for r in range(height)]
    return width, height, b"".join(rows)
