"""Build a catalog recipe into a bootable qcow2, offline from a Debian mirror.

No loop devices, no mounts, no libguestfs: everything happens on plain files,
so that a build needs only root (for ``mmdebstrap --mode=root``) and a few
Debian packages.

Phases, each reported through ``progress`` with its duration:

bootstrap
    ``mmdebstrap`` installs the recipe's packages into a directory. The
    initramfs configuration is put in place by a setup hook, before the kernel
    package builds its initramfs, so the initramfs is built once, small.
configure
    Files written into that directory: fstab, hostname, an empty machine-id,
    cloud-init restricted to NoCloud, systemd-networkd with DHCP, GRUB's
    ``grub.cfg``; SSH host keys removed (cloud-init makes them per guest);
    units enabled and disabled; apt caches removed.
filesystem
    ``mkfs.ext4 -d`` makes the root file system from the directory, in a
    partition-sized sparse file.
bootloader
    The disk file gets an MBR partition table from ``sfdisk``, the partition
    is copied in at 1 MiB (holes stay holes), and GRUB for BIOS is installed by
    hand: ``boot.img`` in the MBR's first 440 bytes, ``core.img`` (diskboot +
    kernel + the modules needed to read ``/boot/grub/grub.cfg``) in sectors
    1.. of the gap before the partition. This is what ``grub-install`` does for
    an MBR disk, without needing a block device.
convert
    ``qemu-img convert`` to an uncompressed, sparse qcow2, then an atomic
    rename onto ``out``.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from ..errors import ImageError, KvmUnavailable
from ..util import fsync_path as fsync_path  # re-exported: kept importable from here
from ..util import rename_synced as rename_synced
from . import crossbuild, foreign, hybrid

# Re-exported: doctor, tests and the mini installer import these from here.
from .bootdisk import GRUB_MODULES as GRUB_MODULES
from .bootdisk import GRUB_PLATFORM_DIR as GRUB_PLATFORM_DIR
from .bootdisk import GRUB_PREFIX as GRUB_PREFIX
from .bootdisk import PARTITION_START as PARTITION_START
from .bootdisk import SECTOR as SECTOR
from .bootdisk import copy_sparse
from .bootdisk import install_grub as install_grub
from .commands import remove_tree, run_command, stream_command, unmount_under
from .mirror import debian_mirror
from .recipe import BUILDER_VERSION, Recipe
from .rootfs import RootConfig, write_file
from .rootfs import kernel_command_line as kernel_command_line

__all__ = ["build_image", "kernel_command_line"]

Progress = Callable[[str], None]

# Commands the builder runs on the host, and the Debian package that has each.
HOST_TOOLS = {
    "mmdebstrap": "mmdebstrap",
    "mkfs.ext4": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "sfdisk": "fdisk",
    "mkfs.vfat": "dosfstools",
    "mmd": "mtools",
    "mcopy": "mtools",
    "dpkg-deb": "dpkg",
    "grub-mkimage": "grub-common",
    "qemu-img": "qemu-utils",
    "chroot": "coreutils",
}


def build_image(
    recipe: Recipe,
    out: Path,
    *,
    mirror: str | None = None,
    progress: Progress = print,
) -> Path:
    """Build ``recipe`` into the qcow2 ``out`` and return ``out``.

    ``out`` appears only complete: the build happens in a temporary directory
    next to it, which is removed on any failure or interrupt. Raises
    :class:`KvmUnavailable` if a needed tool is missing or we are not root,
    :class:`ImageError` if a build step fails, and
    :class:`~pytest_kvm.errors.KvmConfigError` if no mirror is configured.
    """
    tools = _find_tools()
    if os.geteuid() != 0:
        raise KvmUnavailable(
            f"building image {recipe.name!r} needs root (mmdebstrap --mode=root and "
            "file ownership in the root file system); run the build as root"
        )
    mirror = (mirror or debian_mirror()).rstrip("/")
    out = Path(os.path.abspath(out))
    out.parent.mkdir(parents=True, exist_ok=True)

    started = time.monotonic()
    progress(
        f"building image {recipe.name!r} (recipe {recipe.digest()[:12]}, builder "
        f"{BUILDER_VERSION}) from {mirror} {recipe.suite} -> {out}"
    )
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".build", dir=out.parent))
    # apt downloads as the unprivileged _apt user, which must reach the chroot
    work.chmod(0o755)
    try:
        if recipe.architecture == "amd64":
            _Build(recipe, work, mirror, tools, progress).run(work / "disk.qcow2")
        else:
            tools.update(crossbuild.find_foreign_tools(recipe.architecture, _search_path()))
            _ForeignBuild(recipe, work, mirror, tools, progress).run(work / "disk.qcow2")
        rename_synced(work / "disk.qcow2", out)
    finally:
        remove_tree(work, progress)
    size = out.stat().st_blocks * 512
    progress(
        f"built image {recipe.name!r}: {out} ({size / 2**20:.0f} MiB on disk, "
        f"{recipe.disk_size / 2**30:g} GiB virtual) in {time.monotonic() - started:.1f}s"
    )
    return out


def _search_path() -> str:
    return os.pathsep.join(
        [os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"]
    )


def _find_tools() -> dict[str, str]:
    search = _search_path()
    found: dict[str, str] = {}
    missing: list[str] = []
    for tool, package in HOST_TOOLS.items():
        path = shutil.which(tool, path=search)
        if path is None:
            missing.append(f"{tool} (apt-get install {package})")
        else:
            found[tool] = path
    if not (GRUB_PLATFORM_DIR / "boot.img").is_file():
        missing.append(f"{GRUB_PLATFORM_DIR}/boot.img (apt-get install grub-pc-bin)")
    if missing:
        raise KvmUnavailable("cannot build images, missing: " + "; ".join(missing))
    return found


class _Build:
    """One build in one work directory; :meth:`run` does all phases."""

    def __init__(
        self,
        recipe: Recipe,
        work: Path,
        mirror: str,
        tools: dict[str, str],
        progress: Progress,
    ) -> None:
        self.recipe = recipe
        self.work = work
        self.mirror = mirror
        self.tools = tools
        self.progress = progress
        self.root = work / "root"
        self.partition = work / "root.ext4"
        self.disk = work / "disk.raw"
        self.root_uuid = str(uuid.uuid4())
        self.disk_guid = str(uuid.uuid4())
        self.root_guid = str(uuid.uuid4())
        self.debs = work / "efi-debs"
        self.env = {
            **os.environ,
            "LC_ALL": "C.UTF-8",
            "LANG": "C.UTF-8",
            "DEBIAN_FRONTEND": "noninteractive",
            "MTOOLS_SKIP_CHECK": "1",
        }
        self.env.pop("LANGUAGE", None)

    def run(self, qcow2: Path) -> None:
        with self._phase("bootstrap", f"mmdebstrap {self.recipe.suite} from {self.mirror}"):
            self.bootstrap()
        with self._phase("configure", "writing configuration into the root file system"):
            self.configure()
        with self._phase("filesystem", "mkfs.ext4 -d"):
            self.filesystem()
        with self._phase("bootloader", "GPT, BIOS boot partition (GRUB i386-pc), ESP (shim)"):
            self.bootloader()
        with self._phase("convert", "qemu-img convert to qcow2"):
            self.convert(qcow2)

    @contextlib.contextmanager
    def _phase(self, name: str, what: str) -> Iterator[None]:
        self.progress(f"{name}: {what}")
        started = time.monotonic()
        yield
        self.progress(f"{name}: done ({time.monotonic() - started:.1f}s)")

    # -- running commands ------------------------------------------------------

    def _run(self, argv: Sequence[str], *, input: bytes | None = None) -> str:
        return run_command(argv, name=self.recipe.name, env=self.env, input=input)

    def _stream(self, argv: Sequence[str], prefix: str) -> None:
        stream_command(argv, prefix, name=self.recipe.name, env=self.env, progress=self.progress)

    # -- phases ---------------------------------------------------------------

    def bootstrap(self) -> None:
        recipe = self.recipe
        stage = self.work / "stage"
        self._stage_initramfs_config(stage)
        argv = [
            self.tools["mmdebstrap"],
            "--mode=root",
            "--verbose",
            "--format=directory",
            f"--variant={recipe.variant}",
            f"--architectures={recipe.architecture}",
            f"--components={','.join(recipe.components)}",
            '--aptopt=Acquire::Languages "none"',
            # before any package is installed, so that the kernel's postinst
            # builds the initramfs once, with our settings
            f'--setup-hook=cp -a {shlex.quote(str(stage))}/. "$1/"',
        ]
        if not recipe.check_valid_until:
            # kept in the image's apt.conf.d too, so apt-get update works there
            argv.append('--aptopt=Acquire::Check-Valid-Until "false"')
        if recipe.packages:
            argv.append(f"--include={','.join(recipe.packages)}")
        argv += [f"--dpkgopt=path-exclude={p}" for p in recipe.dpkg_path_exclude]
        argv += [f"--dpkgopt=path-include={p}" for p in recipe.dpkg_path_include]
        # Debian's signed shim and GRUB for the ESP, from the image's own suite:
        # the host's apt-get on the chroot's apt state (mmdebstrap sets APT_CONFIG
        # for hooks) into the work directory, so not installed in the image.
        self.debs.mkdir(mode=0o755)
        argv.append(
            f"--customize-hook=cd {shlex.quote(str(self.debs))} && "
            "apt-get download -q " + " ".join(hybrid.SIGNED_FILES)
        )
        argv += [recipe.suite, str(self.root), self.mirror]
        self.progress(f"bootstrap: {shlex.join(argv)}")
        self._stream(argv, "bootstrap: ")

    def _stage_initramfs_config(self, stage: Path) -> None:
        recipe = self.recipe
        conf = stage / "etc/initramfs-tools/conf.d/pytest-kvm.conf"
        write_file(
            conf,
            "# Written by pytest-kvm's image builder.\n"
            f"MODULES={recipe.initramfs_modules}\n"
            f"COMPRESS={recipe.initramfs_compress}\n"
            "RESUME=none\n",
        )
        if recipe.initramfs_drivers:
            hook = stage / "etc/initramfs-tools/hooks/pytest-kvm"
            write_file(
                hook,
                "#!/bin/sh\n"
                "# Written by pytest-kvm's image builder: drivers the guest's root\n"
                "# disk may need, whatever the MODULES= setting.\n"
                "set -e\n"
                'case "$1" in prereqs) exit 0 ;; esac\n'
                ". /usr/share/initramfs-tools/hook-functions\n"
                f"manual_add_modules {' '.join(recipe.initramfs_drivers)}\n",
                mode=0o755,
            )
        for directory in stage.rglob("*"):
            if directory.is_dir():
                directory.chmod(0o755)
        stage.chmod(0o755)

    def configure(self) -> None:
        RootConfig(
            self.recipe, self.root, self.root_uuid, self.tools["chroot"], self._run, self.progress
        ).configure()

    def filesystem(self) -> None:
        size = hybrid.root_size(self.recipe.disk_size)
        with open(self.partition, "wb") as f:
            f.truncate(size)
        self._run(
            [
                self.tools["mkfs.ext4"],
                "-q",
                "-F",
                "-t",
                "ext4",
                "-d",
                str(self.root),
                "-U",
                self.root_uuid,
                "-L",
                "root",
                # initialize inode tables and journal now: otherwise every guest's
                # kernel zeroes them in the background after boot (slow under TCG)
                "-E",
                "lazy_itable_init=0,lazy_journal_init=0",
                str(self.partition),
            ]
        )
        self._run([self.tools["e2fsck"], "-f", "-n", str(self.partition)])

    def bootloader(self) -> None:
        disk_size = self.recipe.disk_size
        with open(self.disk, "wb") as f:
            f.truncate(disk_size)
        script = hybrid.sfdisk_script(disk_size, self.disk_guid, self.root_guid)
        self._run(
            [self.tools["sfdisk"], "--no-reread", "--no-tell-kernel", "--quiet", str(self.disk)],
            input=script.encode(),
        )
        copy_sparse(self.partition, self.disk, hybrid.ROOT_START)
        self.partition.unlink()

        esp = self.work / "esp.fat"
        hybrid.make_esp(esp, self.debs, self.root_uuid, self.tools, self._run)
        copy_sparse(esp, self.disk, hybrid.ESP_START)
        esp.unlink()

        core_path = self.work / "core.img"
        self._run(
            [
                self.tools["grub-mkimage"],
                "--format=i386-pc",
                f"--directory={GRUB_PLATFORM_DIR}",
                f"--prefix={hybrid.GRUB_PREFIX}",
                f"--output={core_path}",
                *hybrid.GRUB_MODULES,
            ]
        )
        boot = bytearray((GRUB_PLATFORM_DIR / "boot.img").read_bytes())
        core = bytearray(core_path.read_bytes())
        install_grub(
            self.disk,
            boot,
            core,
            core_lba=hybrid.BIOS_BOOT_START // SECTOR,
            room=hybrid.ESP_START - hybrid.BIOS_BOOT_START,
        )

    def convert(self, qcow2: Path) -> None:
        self._run(
            [
                self.tools["qemu-img"],
                "convert",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                "compat=1.1",
                str(self.disk),
                str(qcow2),
            ]
        )
        self.disk.unlink()
        with open(qcow2, "rb+") as f:
            os.fsync(f.fileno())
        qcow2.chmod(0o644)


class _ForeignBuild(_Build):
    """A build for arm64 or riscv64 (see :mod:`pytest_kvm.images.crossbuild`):
    unpacked here, configured in a chroot under qemu-user-static."""

    def run(self, qcow2: Path) -> None:
        arch = self.recipe.architecture
        with self._phase("unpack", f"debootstrap --foreign {arch} {self.recipe.suite}"):
            self.unpack()
        with self._phase("stage", "debootstrap --second-stage under qemu-user"):
            self.stage()
        with self._phase("configure", "writing configuration into the root file system"):
            RootConfig(
                self.recipe,
                self.root,
                self.root_uuid,
                self.tools["chroot"],
                self._run,
                self.progress,
                systemctl=[self.tools["systemctl"], f"--root={self.root}"],
            ).configure()
        with self._phase("filesystem", "mkfs.ext4 -d"):
            self.filesystem()
        with self._phase("bootloader", f"GPT, ESP ({arch})"):
            self.bootloader()
        with self._phase("convert", "qemu-img convert to qcow2"):
            self.convert(qcow2)

    def unpack(self) -> None:
        recipe = self.recipe
        first = self.work / "first"
        argv = crossbuild.debootstrap_argv(
            self.tools["debootstrap"],
            architecture=recipe.architecture,
            variant=recipe.variant,
            components=recipe.components,
            packages=recipe.packages,
            suite=recipe.suite,
            target=first,
            mirror=self.mirror,
        )
        self.progress(f"unpack: {shlex.join(argv)}")
        self._stream(argv, "unpack: ")
        removed = crossbuild.prune_excluded(
            first, recipe.dpkg_path_exclude, recipe.dpkg_path_include
        )
        self.progress(f"unpack: {removed} files left out by the recipe's dpkg filters removed")
        # The boot loader's packages, for the ESP only (never installed in the image).
        efi = list(crossbuild.EFI_FILES.get(recipe.architecture, {}))
        if efi:
            argv = [
                self.tools["mmdebstrap"],
                "--mode=root",
                "--variant=extract",
                f"--architectures={recipe.architecture}",
                f"--components={','.join(recipe.components)}",
                '--aptopt=Acquire::Languages "none"',
                f"--include={','.join(efi)}",
                "--format=directory",
                recipe.suite,
                str(self.debs),
                self.mirror,
            ]
            self.progress(f"unpack: {shlex.join(argv)}")
            self._stream(argv, "unpack: ")

    def stage(self) -> None:
        recipe = self.recipe
        arch = crossbuild.foreign_arch(recipe.architecture)
        foreign.ensure_binfmt(arch, self.progress)
        first = self.work / "first"
        if not any((first / "var/cache/apt/archives").glob("linux-image-[0-9]*.deb")):
            raise ImageError(
                f"building {recipe.name!r}: no linux-image package was downloaded; the "
                f"recipe's packages must include linux-image-{recipe.architecture}"
            )
        self._stage_initramfs_config(self.work / "initramfs-stage")
        shutil.copytree(self.work / "initramfs-stage", first, dirs_exist_ok=True, symlinks=True)
        crossbuild.stage_files(first, recipe.dpkg_path_exclude, recipe.dpkg_path_include)
        kept = crossbuild.trim_package_indexes(first)
        self.progress(f"stage: the package index cut to the {kept} packages downloaded")
        argv = foreign.second_stage_argv(self.tools["chroot"], first)
        self.progress(f"stage: {shlex.join(argv)} (under qemu-{arch.qemu_user}-static)")
        cpu = foreign.children_cpu_seconds()
        try:
            self._stream(argv, "stage: ")
        except ImageError as exc:
            raise foreign.stage_error(exc, first) from exc
        finally:
            unmount_under(first)
        self.progress(
            f"stage: the image's programs used {foreign.children_cpu_seconds() - cpu:.0f} "
            "CPU-seconds under qemu-user"
        )
        crossbuild.unstage_files(first)
        first.rename(self.root)
        self.root.chmod(0o755)

    def bootloader(self) -> None:
        recipe = self.recipe
        with open(self.disk, "wb") as f:
            f.truncate(recipe.disk_size)
        script = crossbuild.sfdisk_script(recipe.disk_size, self.disk_guid, self.root_guid)
        self._run(
            [self.tools["sfdisk"], "--no-reread", "--no-tell-kernel", "--quiet", str(self.disk)],
            input=script.encode(),
        )
        copy_sparse(self.partition, self.disk, hybrid.ROOT_START)
        self.partition.unlink()
        esp = self.work / "esp.fat"
        crossbuild.make_esp(
            esp, recipe.architecture, self.debs, self.root_uuid, self.tools, self._run
        )
        copy_sparse(esp, self.disk, hybrid.ESP_START)
        esp.unlink()
