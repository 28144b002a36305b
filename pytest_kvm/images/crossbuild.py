"""Build a recipe for a foreign architecture (arm64, riscv64) on an amd64 host.

Phases, each reported with its duration (see :mod:`pytest_kvm.images.builder` for
the ones shared with native builds):

unpack
    ``debootstrap --foreign`` for the recipe's architecture: Priority required
    unpacked, every other package (``important`` and the recipe's ``packages``,
    with their dependencies) downloaded for the second stage. No code of the
    image runs. The boot loader's packages for the ESP are unpacked apart
    (``mmdebstrap --variant=extract``), never installed into the image.
stage
    The initramfs settings, dpkg's path filters and a policy-rc.d are put into
    the tree; then ``debootstrap --second-stage`` runs in a chroot of it, the
    image's programs under qemu-user-static through binfmt_misc
    (:mod:`pytest_kvm.images.foreign`): every package is configured and the
    kernel's initramfs is built there, with the recipe's settings.
configure, filesystem, bootloader, convert
    As for native builds; the bootloader phase writes a GPT with an ESP and a
    root partition (no BIOS boot partition). arm64: Debian's signed shim and
    GRUB for arm64 as ``\\EFI\\BOOT\\BOOTAA64.EFI``; riscv64: an extlinux.conf
    in the root file system for U-Boot's distro boot.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
from pathlib import Path

from ..errors import ImageError, KvmUnavailable
from . import foreign, hybrid
from .rootfs import write_file

#: Commands a foreign build needs beyond a native one, and the package of each.
FOREIGN_TOOLS = {
    "debootstrap": "debootstrap",
    "tar": "tar",  # not ours: debootstrap unpacks the packages with it
    "systemctl": "systemd",
}

#: debootstrap's variant for a recipe's (mmdebstrap) variant.
DEBOOTSTRAP_VARIANTS = {"important": None, "required": "minbase", "minbase": "minbase"}


def find_foreign_tools(architecture: str, search: str) -> dict[str, str]:
    """The host commands a foreign build of ``architecture`` needs; KvmUnavailable
    naming the Debian package of each missing one."""
    foreign_arch(architecture)
    wanted = FOREIGN_TOOLS
    found: dict[str, str] = {}
    missing = []
    for tool, package in wanted.items():
        path = shutil.which(tool, path=search)
        if path is None:
            missing.append(f"{tool} (apt-get install {package})")
        else:
            found[tool] = path
    if missing:
        raise KvmUnavailable(f"cannot build {architecture} images, missing: " + "; ".join(missing))
    return found


def foreign_arch(architecture: str) -> foreign.ForeignArch:
    """The emulation facts of a Debian architecture; ImageError for an unknown one."""
    try:
        return foreign.ARCHES[architecture]
    except KeyError:
        raise ImageError(f"no foreign-architecture build for {architecture!r}") from None


def debootstrap_argv(
    debootstrap: str,
    *,
    architecture: str,
    variant: str,
    components: tuple[str, ...],
    packages: tuple[str, ...],
    suite: str,
    target: Path,
    mirror: str,
) -> list[str]:
    """``debootstrap --foreign`` for the recipe: unpack, run nothing."""
    if variant not in DEBOOTSTRAP_VARIANTS:
        raise ImageError(
            f"variant {variant!r} cannot be built for {architecture}; "
            f"use one of {', '.join(DEBOOTSTRAP_VARIANTS)}"
        )
    argv = [debootstrap, "--foreign", f"--arch={architecture}", "--merged-usr"]
    if DEBOOTSTRAP_VARIANTS[variant]:
        argv.append(f"--variant={DEBOOTSTRAP_VARIANTS[variant]}")
    argv.append(f"--components={','.join(components)}")
    if packages:
        argv.append(f"--include={','.join(packages)}")
    argv += [suite, str(target), mirror]
    return argv


def excluded(path: str, excludes: tuple[str, ...], includes: tuple[str, ...]) -> bool:
    """Whether dpkg's ``--path-exclude``/``--path-include`` filters leave out ``path``
    (absolute): the last matching pattern wins, as in dpkg (fnmatch, ``*`` crosses ``/``)."""
    verdict = False
    for pattern, result in [(p, True) for p in excludes] + [(p, False) for p in includes]:
        if fnmatch.fnmatchcase(path, pattern):
            verdict = result
    return verdict


def prune_excluded(root: Path, excludes: tuple[str, ...], includes: tuple[str, ...]) -> int:
    """Remove the files debootstrap's first stage unpacked that dpkg's filters leave
    out (it unpacks with ``ar`` and ``tar``, which know no filters); the count."""
    if not excludes:
        return 0
    removed = 0
    for directory, _dirs, files in os.walk(root):
        for name in files:
            path = Path(directory, name)
            if excluded("/" + str(path.relative_to(root)), excludes, includes):
                path.unlink()
                removed += 1
    return removed


def dpkg_filter_config(excludes: tuple[str, ...], includes: tuple[str, ...]) -> str:
    """/etc/dpkg/dpkg.cfg.d's file of the recipe's filters (kept in the image)."""
    lines = [f"path-exclude={p}" for p in excludes] + [f"path-include={p}" for p in includes]
    return "# Written by pytest-kvm's image builder.\n" + "".join(f"{line}\n" for line in lines)


def trim_package_indexes(root: Path) -> int:
    """Cut the archive's package indexes in ``root`` down to the packages the first
    stage downloaded; the number of stanzas kept.

    The second stage looks up each package's details by running a perl script over
    the whole index (about 50 MB for bookworm's main), once per lookup; under
    qemu-user that took minutes. It never asks about a package it did not download
    (``/debootstrap/debpaths`` lists those), so the rest of the index can go."""
    wanted = {
        line.split(" ", 1)[0].encode()
        for line in (root / "debootstrap/debpaths").read_text().splitlines()
        if line.strip()
    }
    kept = 0
    for index in (root / "var/lib/apt/lists").glob("*_Packages"):
        stanzas = [
            stanza
            for stanza in index.read_bytes().split(b"\n\n")
            if stanza.startswith(b"Package: ")
            and stanza[len(b"Package: ") :].split(b"\n", 1)[0].strip() in wanted
        ]
        kept += len(stanzas)
        index.write_bytes(b"\n\n".join(stanzas) + b"\n\n")
    return kept


def stage_files(root: Path, excludes: tuple[str, ...], includes: tuple[str, ...]) -> None:
    """What the tree needs before the second stage runs: dpkg's configuration
    (the recipe's filters, unsafe I/O for the build), no service starts from
    maintainer scripts."""
    if excludes or includes:
        write_file(
            root / "etc/dpkg/dpkg.cfg.d/99pytest-kvm", dpkg_filter_config(excludes, includes)
        )
    write_file(
        root / foreign.DPKG_UNSAFE_IO,
        "# pytest-kvm's image build only: removed after the stage.\nforce-unsafe-io\n",
    )
    write_file(root / foreign.POLICY_RC_D, "#!/bin/sh\nexit 101\n", mode=0o755)


def unstage_files(root: Path) -> None:
    """Remove what only the build needed: the policy-rc.d, unsafe I/O, the .debs."""
    for name in (foreign.POLICY_RC_D, foreign.DPKG_UNSAFE_IO):
        (root / name).unlink(missing_ok=True)
    for deb in (root / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()


# -- the boot partitions ------------------------------------------------------------

#: Debian packages for the ESP per architecture, and the file each contributes.
EFI_FILES: dict[str, dict[str, str]] = {
    "arm64": {
        "shim-signed": "usr/lib/shim/shimaa64.efi.signed",
        "grub-efi-arm64-signed": "usr/lib/grub/arm64-efi-signed/grubaa64.efi.signed",
    },
}
#: Where each file goes on the ESP (the removable-media path the firmware boots).
EFI_TARGETS: dict[str, dict[str, str]] = {
    "arm64": {
        "shim-signed": "::/EFI/BOOT/BOOTAA64.EFI",
        "grub-efi-arm64-signed": "::/EFI/BOOT/grubaa64.efi",
    },
}


def sfdisk_script(disk_size: int, disk_guid: str, root_guid: str) -> str:
    """A GPT with the ESP and the root at the native images' offsets, no BIOS boot."""
    sector = 512
    return (
        "label: gpt\n"
        f"label-id: {disk_guid}\n"
        "unit: sectors\n\n"
        f"disk.raw1 : start={hybrid.ROOT_START // sector}, "
        f"size={hybrid.root_size(disk_size) // sector}, type={hybrid.LINUX_TYPE}, "
        f"uuid={root_guid}, name=root, attrs=LegacyBIOSBootable\n"
        f"disk.raw15 : start={hybrid.ESP_START // sector}, "
        f"size={(hybrid.ROOT_START - hybrid.ESP_START) // sector}, "
        f"type={hybrid.ESP_TYPE}, name=esp\n"
    )


def make_esp(
    path: Path,
    architecture: str,
    unpacked: Path,
    root_uuid: str,
    tools: dict[str, str],
    run: hybrid.Run,
) -> None:
    """The ESP's FAT file system: the architecture's boot files from ``unpacked``
    (the EFI packages, extracted), or empty but present where there are none."""
    files = EFI_FILES.get(architecture, {})
    for package, relative in files.items():
        if not (unpacked / relative).is_file():
            raise ImageError(f"{relative} is not in {package} for {architecture}")
    run(
        [
            tools["mkfs.vfat"],
            "-C",
            "-n",
            "ESP",
            "-i",
            hybrid.esp_volume_id(root_uuid),
            str(path),
            str((hybrid.ROOT_START - hybrid.ESP_START) // 1024),
        ]
    )
    if not files:
        return
    cfg = unpacked / "pytest-kvm-esp-grub.cfg"
    cfg.write_text(hybrid.esp_grub_cfg(root_uuid))
    image = f"-i{path}"
    run([tools["mmd"], image, "::/EFI", "::/EFI/BOOT", "::/EFI/debian"])
    copies = [(unpacked / files[p], EFI_TARGETS[architecture][p]) for p in files]
    copies += [(cfg, "::/EFI/BOOT/grub.cfg"), (cfg, "::/EFI/debian/grub.cfg")]
    for source, target in copies:
        run([tools["mcopy"], image, str(source), target])
