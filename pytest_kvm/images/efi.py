"""Whether an image has a signed UEFI boot path (for ``firmware=uefi-secure``): a GPT
with an EFI system partition holding ``\\EFI\\BOOT\\BOOTX64.EFI`` with an Authenticode
signature (Debian's shim is one). Read with ``qemu-img dd`` (through backing files)
and mtools, no mount and no libguestfs; remembered per file identity.
"""

from __future__ import annotations

import functools
import shutil
import struct
import subprocess
import tempfile
import uuid
from pathlib import Path

SECTOR = 512
ESP_TYPE = uuid.UUID("C12A7328-F81F-11D2-BA4B-00A0C93EC93B")
BOOT_FILE = "::/EFI/BOOT/BOOTX64.EFI"
_MAX_ESP = 2 << 30  # an ESP bigger than this is not read (it would be copied)


def signed_boot_refusal(path: Path, fmt: str) -> str:
    """ "" if ``path`` has a signed boot path; else what it lacks, in a few words."""
    st = path.stat()
    return _refusal(str(path), fmt, st.st_size, st.st_mtime_ns, st.st_ino)


@functools.lru_cache(maxsize=64)
def _refusal(path: str, fmt: str, size: int, mtime: int, inode: int) -> str:
    del size, mtime, inode  # the cache key: the file's identity
    qemu_img, mcopy = shutil.which("qemu-img"), shutil.which("mcopy")
    if qemu_img is None or mcopy is None:
        return "cannot look for an EFI system partition without qemu-img and mtools"
    with tempfile.TemporaryDirectory(prefix="pytest-kvm-efi-") as tmp:
        work = Path(tmp)
        head = read_sectors(qemu_img, path, fmt, work / "head", 0, 34)
        esp = find_esp(head)
        if esp is None:
            return "no GPT with an EFI system partition"
        first, last = esp
        if (last - first + 1) * SECTOR > _MAX_ESP:
            return "its EFI system partition is too big to check"
        read_sectors(qemu_img, path, fmt, work / "esp", first, last - first + 1)
        boot = work / "BOOTX64.EFI"
        copied = subprocess.run(
            [mcopy, "-n", "-i", str(work / "esp"), BOOT_FILE, str(boot)],
            capture_output=True,
            env={"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"},
        )
        if copied.returncode != 0 or not boot.is_file():
            return "no \\EFI\\BOOT\\BOOTX64.EFI on its EFI system partition"
        if not is_signed_pe(boot.read_bytes()):
            return "its \\EFI\\BOOT\\BOOTX64.EFI is not signed"
    return ""


def read_sectors(qemu_img: str, path: str, fmt: str, out: Path, skip: int, count: int) -> bytes:
    """``count`` sectors from ``skip`` of a disk image of any format; b"" if that fails
    (or for more than 64 sectors: those are left in ``out``)."""
    argv = [qemu_img, "dd", "-f", fmt, "-O", "raw", f"bs={SECTOR}", f"skip={skip}"]
    argv += [f"count={count}", f"if={path}", f"of={out}"]
    done = subprocess.run(argv, capture_output=True)
    if done.returncode != 0 or not out.is_file():
        return b""
    return out.read_bytes() if count <= 64 else b""


def find_esp(head: bytes) -> tuple[int, int] | None:
    """The ESP's first and last LBA from a disk's first 34 sectors (primary GPT)."""
    header = head[SECTOR : 2 * SECTOR]
    if len(header) < 92 or header[:8] != b"EFI PART":
        return None
    entries_lba, count, entry_size = struct.unpack_from("<QII", header, 72)
    table = head[entries_lba * SECTOR :]
    for i in range(min(count, len(table) // max(entry_size, 128))):
        entry = table[i * entry_size : (i + 1) * entry_size]
        if uuid.UUID(bytes_le=bytes(entry[:16])) == ESP_TYPE:
            first, last = struct.unpack_from("<QQ", entry, 32)
            return first, last
    return None


def is_signed_pe(data: bytes) -> bool:
    """A PE32+ image whose certificate table (Authenticode) is not empty."""
    if len(data) < 0x40 or data[:2] != b"MZ":
        return False
    (pe,) = struct.unpack_from("<I", data, 0x3C)
    if data[pe : pe + 4] != b"PE\0\0":
        return False
    optional = pe + 24
    (magic,) = struct.unpack_from("<H", data, optional)
    directories = optional + (112 if magic == 0x20B else 96)
    # data directory 4: the certificate table (file offset, size)
    offset, size = struct.unpack_from("<II", data, directories + 4 * 8)
    return bool(size > 0 and offset + size <= len(data))
