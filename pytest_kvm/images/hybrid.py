"""The catalog images' hybrid layout, like Debian's cloud images: a GPT disk that
boots under BIOS (GRUB i386-pc: boot.img in the protective MBR, core.img in a BIOS
boot partition) and under UEFI, with or without Secure Boot (Debian's signed shim
and GRUB on an EFI system partition), all made on plain files.

    partition 14  BIOS boot    1 MiB ..  2 MiB  GRUB's core.img
    partition 15  ESP (FAT)    2 MiB .. 32 MiB  /EFI/BOOT: BOOTX64.EFI (shim), grubx64.efi, grub.cfg
    partition 1   root (ext4) 32 MiB .. end     /boot/grub/grub.cfg: the one boot menu

The root stays partition 1 (GRUB's prefix ``(hd0,gpt1)``, growpart and
libguestfs find it as before); the ESP's grub.cfg finds it by UUID.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import ImageError

Run = Callable[[Sequence[str]], str]

MIB = 1024 * 1024
BIOS_BOOT_START = 1 * MIB
ESP_START = 2 * MIB
ROOT_START = 32 * MIB
#: the last MiB stays free: the backup GPT lives in its last 33 sectors
TAIL = 1 * MIB

GRUB_PREFIX = "(hd0,gpt1)/boot/grub"
GRUB_MODULES = ("biosdisk", "part_gpt", "ext2", "normal", "linux", "echo", "serial", "terminal")

BIOS_BOOT_TYPE = "21686148-6449-6E6F-744E-656564454649"
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX_TYPE = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"

#: Debian packages with the signed boot path, and the file each contributes.
SIGNED_FILES = {
    "shim-signed": "usr/lib/shim/shimx64.efi.signed",
    "grub-efi-amd64-signed": "usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed",
}


def root_size(disk_size: int) -> int:
    """The root partition's (and file system's) size in bytes."""
    return disk_size - ROOT_START - TAIL


def sfdisk_script(disk_size: int, disk_guid: str, root_guid: str) -> str:
    """sfdisk's input for the layout (partition numbers from the ``disk.rawN`` names)."""
    sector = 512
    return (
        "label: gpt\n"
        f"label-id: {disk_guid}\n"
        "unit: sectors\n\n"
        f"disk.raw1 : start={ROOT_START // sector}, size={root_size(disk_size) // sector}, "
        f"type={LINUX_TYPE}, uuid={root_guid}, name=root\n"
        f"disk.raw14 : start={BIOS_BOOT_START // sector}, "
        f"size={(ESP_START - BIOS_BOOT_START) // sector}, type={BIOS_BOOT_TYPE}, name=bios\n"
        f"disk.raw15 : start={ESP_START // sector}, size={(ROOT_START - ESP_START) // sector}, "
        f"type={ESP_TYPE}, name=esp\n"
    )


def esp_volume_id(root_uuid: str) -> str:
    """The ESP's FAT volume id (``mkfs.vfat -i``), made from the root's UUID: 8 hex digits."""
    return root_uuid.replace("-", "")[:8].upper()


def esp_fstab_line(root_uuid: str) -> str:
    """/etc/fstab's line for the ESP on /boot/efi, as Debian's installer writes it: by
    the FAT volume id (``UUID=ABCD-1234``, what blkid and /dev/disk/by-uuid show)."""
    vid = esp_volume_id(root_uuid)
    return f"UUID={vid[:4]}-{vid[4:]}\t/boot/efi\tvfat\tumask=0077\t0\t1\n"


def esp_grub_cfg(root_uuid: str) -> str:
    """The ESP's grub.cfg: find the root by UUID, then the image's one boot menu."""
    return (
        "# Written by pytest-kvm's image builder.\n"
        f"search --no-floppy --fs-uuid --set=root {root_uuid}\n"
        "set prefix=($root)/boot/grub\n"
        "configfile $prefix/grub.cfg\n"
    )


def make_esp(
    path: Path,
    debs: Path,
    root_uuid: str,
    tools: dict[str, str],
    run: Run,
) -> None:
    """Make the ESP's FAT file system in ``path`` from the signed binaries in ``debs``.

    ``debs`` holds the packages of :data:`SIGNED_FILES`, downloaded from the
    image's own suite; they are unpacked with ``dpkg-deb -x`` and their signed
    files copied in with mtools (no mount).
    """
    unpacked = debs / "unpacked"
    for package in SIGNED_FILES:
        found = sorted(debs.glob(f"{package}_*.deb"))
        if not found:
            raise ImageError(f"no {package} package was downloaded for the EFI system partition")
        run([tools["dpkg-deb"], "-x", str(found[-1]), str(unpacked)])
    shim = unpacked / SIGNED_FILES["shim-signed"]
    grub = unpacked / SIGNED_FILES["grub-efi-amd64-signed"]
    for signed in (shim, grub):
        if not signed.is_file():
            raise ImageError(f"{signed.relative_to(unpacked)} is not in its package")
    cfg = debs / "grub.cfg"
    cfg.write_text(esp_grub_cfg(root_uuid))
    run(
        [
            tools["mkfs.vfat"],
            "-C",
            "-n",
            "ESP",
            "-i",
            esp_volume_id(root_uuid),
            str(path),
            str((ROOT_START - ESP_START) // 1024),
        ]
    )
    image = f"-i{path}"
    run([tools["mmd"], image, "::/EFI", "::/EFI/BOOT", "::/EFI/debian"])
    for source, target in (
        (shim, "::/EFI/BOOT/BOOTX64.EFI"),
        (grub, "::/EFI/BOOT/grubx64.efi"),
        (cfg, "::/EFI/BOOT/grub.cfg"),
        # Debian's signed GRUB looks in /EFI/debian (its built-in prefix) first
        (cfg, "::/EFI/debian/grub.cfg"),
    ):
        run([tools["mcopy"], image, str(source), target])
