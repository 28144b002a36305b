"""The boot disk's layout: an MBR partition at 1 MiB and GRUB for BIOS installed
by hand in the gap before it (what ``grub-install`` does, without a block device),
and copying the partition in with its holes kept.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from ..errors import ImageError

SECTOR = 512
PARTITION_START = 1024 * 1024  # 1 MiB: the MBR gap holds GRUB's core.img
GRUB_PLATFORM_DIR = Path("/usr/lib/grub/i386-pc")
# Modules built into core.img. biosdisk/part_msdos/ext2 find /boot/grub;
# the rest make grub.cfg work without a module directory on the disk.
GRUB_MODULES = ("biosdisk", "part_msdos", "ext2", "normal", "linux", "echo", "serial", "terminal")
GRUB_PREFIX = "(hd0,msdos1)/boot/grub"

# Offsets in GRUB 2's boot.img (grub-core/boot/i386/pc/boot.S, include/grub/i386/pc/boot.h).
_BOOT_CODE_END = 0x1B8  # 440: code ends, disk signature and partition table follow
_BOOT_KERNEL_SECTOR = 0x5C  # u64: LBA of core.img's first sector (diskboot.img)
_BOOT_DRIVE = 0x64  # u8: 0xff = use the drive the BIOS passed in DL
_BOOT_DRIVE_CHECK = 0x66  # "jmp" over the DL sanity check; grub-setup nops it for disks
# diskboot.img (core.img's first sector) ends with a blocklist: u64 start, u16 length, u16 segment.
_DISKBOOT_LIST_START = SECTOR - 12


def install_grub(
    disk: Path,
    boot: bytearray,
    core: bytearray,
    *,
    core_lba: int = 1,
    room: int = PARTITION_START - SECTOR,
) -> None:
    """Put GRUB's ``boot.img`` and ``core.img`` on a disk image, like grub-setup.

    ``core.img`` goes to sector ``core_lba`` onwards (by default the gap before
    the first MBR partition at 1 MiB; on a GPT disk the BIOS boot partition, of
    ``room`` bytes); ``boot.img``'s code goes into the (protective) MBR's first
    440 bytes, keeping the disk signature and partition table that sfdisk wrote.
    """
    if len(boot) != SECTOR:
        raise ImageError(f"GRUB boot.img is {len(boot)} bytes, expected {SECTOR}")
    if len(core) > room:
        raise ImageError(f"GRUB core.img is {len(core)} bytes; it must fit the {room}-byte gap")
    # boot.img loads core.img's first sector from this LBA (its default is 1).
    struct.pack_into("<Q", boot, _BOOT_KERNEL_SECTOR, core_lba)
    if boot[_BOOT_DRIVE] != 0xFF:
        # 0xff: trust the drive number the BIOS passes in DL (SeaBIOS does it right)
        boot[_BOOT_DRIVE] = 0xFF
    if boot[_BOOT_DRIVE_CHECK] == 0xEB:  # short jmp: as grub-setup does for hard disks
        boot[_BOOT_DRIVE_CHECK : _BOOT_DRIVE_CHECK + 2] = b"\x90\x90"
    # diskboot.img then reads the rest of core.img from the next LBA, contiguously;
    # grub-mkimage already filled in the length.
    (start,) = struct.unpack_from("<Q", core, _DISKBOOT_LIST_START)
    (length,) = struct.unpack_from("<H", core, _DISKBOOT_LIST_START + 8)
    expected = (len(core) + SECTOR - 1) // SECTOR - 1
    if length != expected:
        raise ImageError(
            f"GRUB core.img's blocklist says {length} sectors, expected {expected}; "
            "unsupported grub-mkimage output"
        )
    if start != core_lba + 1:
        struct.pack_into("<Q", core, _DISKBOOT_LIST_START, core_lba + 1)
    with open(disk, "rb+") as f:
        mbr = bytearray(f.read(SECTOR))
        if mbr[510:512] != b"\x55\xaa":
            raise ImageError(f"{disk}: no MBR partition table to install GRUB next to")
        mbr[:_BOOT_CODE_END] = boot[:_BOOT_CODE_END]
        f.seek(0)
        f.write(mbr)
        f.seek(core_lba * SECTOR)
        f.write(core)


def copy_sparse(src: Path, dst: Path, offset: int) -> None:
    """Copy ``src`` into ``dst`` at ``offset``; holes in ``src`` stay holes."""
    with open(src, "rb") as fin, open(dst, "rb+") as fout:
        end = os.fstat(fin.fileno()).st_size
        pos = 0
        while pos < end:
            try:
                data = os.lseek(fin.fileno(), pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            hole = os.lseek(fin.fileno(), data, os.SEEK_HOLE)
            _copy_range(fin.fileno(), fout.fileno(), data, offset + data, hole - data)
            pos = hole


def _copy_range(fin: int, fout: int, src: int, dst: int, count: int) -> None:
    while count > 0:
        try:
            n = os.copy_file_range(fin, fout, min(count, 1 << 30), src, dst)
        except OSError:
            n = 0
        if n == 0:  # not supported here (or across file systems): plain copy
            chunk = os.pread(fin, min(count, 8 << 20), src)
            if not chunk:
                raise ImageError("unexpected end of file while copying the partition")
            n = os.pwrite(fout, chunk, dst)
        src += n
        dst += n
        count -= n
