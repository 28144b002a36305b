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
import re
import selectors
import shlex
import shutil
import signal
import struct
import subprocess
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from ..errors import ImageError, KvmUnavailable
from ..util import fsync_path as fsync_path  # re-exported: kept importable from here
from ..util import rename_synced as rename_synced
from ..util import tail_text
from .mirror import debian_mirror
from .recipe import BUILDER_VERSION, Recipe

__all__ = ["build_image", "kernel_command_line"]

Progress = Callable[[str], None]

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

# Commands the builder runs on the host, and the Debian package that has each.
HOST_TOOLS = {
    "mmdebstrap": "mmdebstrap",
    "mkfs.ext4": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "sfdisk": "fdisk",
    "grub-mkimage": "grub-common",
    "qemu-img": "qemu-utils",
    "chroot": "coreutils",
}

_TAIL_LINES = 40

# The line of cloud-init's configuration that says who configures the network.
_NETWORK_COMMENT = {
    "networkd": "# systemd-networkd's 10-dhcp.network configures the network.\n",
    "ifupdown": "# ifupdown (/etc/network/interfaces, DHCP on eth0) configures the network.\n",
}
_CHATTER_INTERVAL = 2.0  # seconds between forwarded apt/dpkg lines
_QUIET_INTERVAL = 10.0  # a "still running" line after this long without output


def kernel_command_line(recipe: Recipe, root_uuid: str) -> str:
    """The guest kernel's command line, as written to ``grub.cfg``."""
    base = [
        f"root=UUID={root_uuid}",
        "ro",
        "console=tty0",
        "console=ttyS0,115200n8",
    ]
    return " ".join([*base, *recipe.kernel_args])


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
        _Build(recipe, work, mirror, tools, progress).run(work / "disk.qcow2")
        rename_synced(work / "disk.qcow2", out)
    finally:
        _remove_tree(work, progress)
    size = out.stat().st_blocks * 512
    progress(
        f"built image {recipe.name!r}: {out} ({size / 2**20:.0f} MiB on disk, "
        f"{recipe.disk_size / 2**30:g} GiB virtual) in {time.monotonic() - started:.1f}s"
    )
    return out


def _find_tools() -> dict[str, str]:
    search = os.pathsep.join(
        [os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"]
    )
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
        self.disk_id = uuid.uuid4().int & 0xFFFFFFFF or 1
        self.env = {
            **os.environ,
            "LC_ALL": "C.UTF-8",
            "LANG": "C.UTF-8",
            "DEBIAN_FRONTEND": "noninteractive",
        }
        self.env.pop("LANGUAGE", None)

    def run(self, qcow2: Path) -> None:
        with self._phase("bootstrap", f"mmdebstrap {self.recipe.suite} from {self.mirror}"):
            self.bootstrap()
        with self._phase("configure", "writing configuration into the root file system"):
            self.configure()
        with self._phase("filesystem", "mkfs.ext4 -d"):
            self.filesystem()
        with self._phase("bootloader", "partition table and GRUB (i386-pc) in the MBR gap"):
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
        try:
            done = subprocess.run(
                list(argv),
                input=input,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=self.env,
                check=False,
            )
        except OSError as exc:
            raise ImageError(f"building {self.recipe.name!r}: cannot run {argv[0]}: {exc}") from exc
        output = done.stdout.decode(errors="replace")
        if done.returncode != 0:
            raise ImageError(
                f"building {self.recipe.name!r}: {shlex.join(argv)} failed "
                f"(exit {done.returncode}):\n{tail_text(output, _TAIL_LINES)}"
            )
        return output

    def _stream(self, argv: Sequence[str], prefix: str) -> None:
        """Run ``argv``, passing its output to ``progress`` as it comes.

        mmdebstrap's own lines (``I:``, ``W:``, ``E:``) all pass; the flood of
        apt and dpkg lines that ``--verbose`` adds is thinned to one every
        couple of seconds, and a quiet stretch (extracting archives) gets a
        "still running" line, so the user never stares at silence for long.
        """
        tail: deque[str] = deque(maxlen=_TAIL_LINES)
        try:
            proc = subprocess.Popen(
                list(argv),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
            )
        except OSError as exc:
            raise ImageError(f"building {self.recipe.name!r}: cannot run {argv[0]}: {exc}") from exc
        assert proc.stdout is not None
        started = last_shown = time.monotonic()
        last_chatter = started - _CHATTER_INTERVAL
        last_info = ""
        pending = b""
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(proc.stdout, selectors.EVENT_READ)
                while True:
                    ready = selector.select(timeout=1.0)
                    now = time.monotonic()
                    chunk = os.read(proc.stdout.fileno(), 65536) if ready else None
                    if chunk == b"":
                        break
                    if chunk is None:
                        if now - last_shown >= _QUIET_INTERVAL:
                            last_shown = now
                            self.progress(
                                f"{prefix}... still running ({now - started:.0f}s)"
                                + (f", last: {last_info}" if last_info else "")
                            )
                        continue
                    pending += chunk.replace(b"\r", b"\n")
                    *lines, pending = pending.split(b"\n")
                    for raw in lines:
                        line = raw.decode(errors="replace").rstrip()
                        if not line:
                            continue
                        tail.append(line)
                        if line[:2] in ("I:", "W:", "E:"):
                            last_info = line
                        elif now - last_chatter < _CHATTER_INTERVAL:
                            continue
                        else:
                            last_chatter = now
                        last_shown = now
                        self.progress(f"{prefix}{line}")
            if pending.strip():
                tail.append(pending.decode(errors="replace").rstrip())
            returncode = proc.wait()
        except BaseException:
            _stop(proc)
            raise
        finally:
            proc.stdout.close()
        if returncode != 0:
            raise ImageError(
                f"building {self.recipe.name!r}: {shlex.join(argv)} failed "
                f"(exit {returncode}):\n" + "\n".join(tail)
            )

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
        argv += [recipe.suite, str(self.root), self.mirror]
        self.progress(f"bootstrap: {shlex.join(argv)}")
        self._stream(argv, "bootstrap: ")

    def _stage_initramfs_config(self, stage: Path) -> None:
        recipe = self.recipe
        conf = stage / "etc/initramfs-tools/conf.d/pytest-kvm.conf"
        _write(
            conf,
            "# Written by pytest-kvm's image builder.\n"
            f"MODULES={recipe.initramfs_modules}\n"
            f"COMPRESS={recipe.initramfs_compress}\n"
            "RESUME=none\n",
        )
        if recipe.initramfs_drivers:
            hook = stage / "etc/initramfs-tools/hooks/pytest-kvm"
            _write(
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
        root = self.root
        recipe = self.recipe
        kernel = self._find_boot_files()

        _write(root / "etc/hostname", f"{recipe.hostname}\n")
        _write(
            root / "etc/hosts",
            f"127.0.0.1\tlocalhost\n127.0.1.1\t{recipe.hostname}\n\n"
            "::1\tlocalhost ip6-localhost ip6-loopback\n"
            "ff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n",
        )
        _write(
            root / "etc/fstab",
            "# Written by pytest-kvm's image builder.\n"
            f"UUID={self.root_uuid}\t/\text4\terrors=remount-ro\t0\t1\n",
        )
        # Empty: systemd makes a new one on each guest's first boot.
        _write(root / "etc/machine-id", "", mode=0o444)
        _unlink(root / "var/lib/dbus/machine-id")
        if (root / "var/lib/dbus").is_dir():
            (root / "var/lib/dbus/machine-id").symlink_to("/etc/machine-id")
        # cloud-init writes host keys per guest (from the seed, or generated).
        for key in (root / "etc/ssh").glob("ssh_host_*"):
            key.unlink()
        _write(root / "etc/default/locale", "LANG=C.UTF-8\n")
        self._lock_root_password()
        self._configure_resolv_conf()

        _write(
            root / "etc/cloud/cloud.cfg.d/90-pytest-kvm.cfg",
            "# Written by pytest-kvm's image builder.\n"
            "# Only the NoCloud seed (a cidata CD or disk) configures guests;\n"
            "# nothing probes for cloud metadata services.\n"
            "datasource_list: [ NoCloud, None ]\n"
            + _NETWORK_COMMENT[recipe.network]
            + "network: {config: disabled}\n"
            "# RSA host key generation takes seconds under TCG; these take\n"
            "# milliseconds. A seed can still supply its own ssh_keys.\n"
            "ssh_genkeytypes: [ed25519, ecdsa]\n"
            "# C.UTF-8 is built in: no locale generation at boot.\n"
            "locale: C.UTF-8\n"
            "# No GRUB package in the image for it to configure.\n"
            "grub_dpkg: {enabled: false}\n",
        )
        if recipe.network == "ifupdown":
            self._configure_ifupdown()
        else:
            self._configure_networkd()
        self._configure_units()

        cmdline = kernel_command_line(recipe, self.root_uuid)
        _write(
            root / "boot/grub/grub.cfg",
            "# Written by pytest-kvm's image builder.\n"
            "serial --unit=0 --speed=115200\n"
            "terminal_input serial console\n"
            "terminal_output serial\n"
            "set default=0\n"
            "set timeout=0\n"
            f"menuentry '{recipe.description or recipe.name}' {{\n"
            f"\techo 'GRUB: loading {kernel[0]}'\n"
            f"\tlinux {kernel[0]} {cmdline}\n"
            f"\techo 'GRUB: loading {kernel[1]}'\n"
            f"\tinitrd {kernel[1]}\n"
            "\techo 'GRUB: starting the kernel'\n"
            "}\n",
        )
        self.progress(f"configure: kernel command line: {cmdline}")
        self._clean()

    def _configure_networkd(self) -> None:
        root = self.root
        _write(
            root / "etc/systemd/network/10-dhcp.network",
            "# Written by pytest-kvm's image builder.\n"
            "[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n"
            "# A test reaches a bridge guest at its DHCP address: never drop it while\n"
            "# the DHCP client stops, restarts or renews (it is re-acquired in place).\n"
            "KeepConfiguration=dhcp\n",
        )
        wait_online = self._guest_path("lib/systemd/systemd-networkd-wait-online")
        _write(
            root / "etc/systemd/system/systemd-networkd-wait-online.service.d/pytest-kvm.conf",
            "# Written by pytest-kvm's image builder: one link is enough,\n"
            "# and never stall the boot for long.\n"
            f"[Service]\nExecStart=\nExecStart={wait_online} --any --timeout=20\n",
        )

    def _configure_ifupdown(self) -> None:
        """DHCP on eth0 (the recipe has net.ifnames=0) by ifupdown's networking
        script: for images without systemd. ``auto``, not ``allow-hotplug``: the
        boot waits for the lease, so sshd starts with the network up."""
        self._guest_path("sbin/ifup")  # the recipe must install ifupdown
        _write(
            self.root / "etc/network/interfaces",
            "# Written by pytest-kvm's image builder.\n"
            "source /etc/network/interfaces.d/*\n\n"
            "auto lo\niface lo inet loopback\n\n"
            "auto eth0\niface eth0 inet dhcp\n",
        )

    def _guest_path(self, relative: str) -> str:
        """``/usr/lib/...`` or ``/lib/...``, whichever the guest has as a real file."""
        for candidate in (f"usr/{relative}", relative):
            if (self.root / candidate).exists():
                return f"/{candidate}"
        raise ImageError(f"building {self.recipe.name!r}: /{relative} not found in the image")

    def _find_boot_files(self) -> tuple[str, str]:
        """The kernel and initramfs paths for grub.cfg (Debian's /vmlinuz symlinks)."""
        root = self.root
        kernels = sorted((root / "boot").glob("vmlinuz-*"))
        if not kernels:
            raise ImageError(
                f"building {self.recipe.name!r}: no kernel in /boot; the recipe's "
                "packages must include a linux-image-* package"
            )
        for link, pattern in (("vmlinuz", "vmlinuz-*"), ("initrd.img", "initrd.img-*")):
            target = root / link
            if target.is_symlink():
                # resolve inside the image, not on the build host
                if (root / os.readlink(target).lstrip("/")).is_file():
                    continue
            elif target.is_file():
                continue
            found = sorted((root / "boot").glob(pattern))
            if not found:
                raise ImageError(
                    f"building {self.recipe.name!r}: no /boot/{pattern} in the image "
                    "(did initramfs-tools fail?)"
                )
            _unlink(target)
            target.symlink_to(f"boot/{found[-1].name}")
        return "/vmlinuz", "/initrd.img"

    def _lock_root_password(self) -> None:
        shadow = self.root / "etc/shadow"
        lines = shadow.read_text().splitlines()
        for i, line in enumerate(lines):
            fields = line.split(":")
            if fields[0] == "root" and len(fields) > 1 and not fields[1].startswith(("!", "*")):
                fields[1] = "!" + fields[1]
                lines[i] = ":".join(fields)
        _write(shadow, "\n".join(lines) + "\n", mode=0o640, keep_owner=True)

    def _configure_resolv_conf(self) -> None:
        root = self.root
        resolv = root / "etc/resolv.conf"
        _unlink(root / "etc/.resolv.conf.systemd-resolved.bak")
        _unlink(resolv)
        if (root / "usr/lib/systemd/systemd-resolved").exists() or (
            root / "lib/systemd/systemd-resolved"
        ).exists():
            resolv.symlink_to("../run/systemd/resolve/stub-resolv.conf")
        else:
            # never the build host's resolvers
            _write(resolv, "")

    def _unit_exists(self, unit: str) -> bool:
        for directory in ("etc/systemd/system", "usr/lib/systemd/system", "lib/systemd/system"):
            if (self.root / directory / unit).exists():
                return True
        return False

    def _configure_units(self) -> None:
        chroot = self.tools["chroot"]
        for unit in self.recipe.enable_units:
            if not self._unit_exists(unit):
                raise ImageError(
                    f"building {self.recipe.name!r}: unit {unit} to enable is not installed"
                )
        if self.recipe.enable_units:
            self._run([chroot, str(self.root), "systemctl", "enable", *self.recipe.enable_units])
        disable = [u for u in self.recipe.disable_units if self._unit_exists(u)]
        if disable:
            self._run([chroot, str(self.root), "systemctl", "disable", *disable])
        if self.recipe.mask_units:
            self._run([chroot, str(self.root), "systemctl", "mask", *self.recipe.mask_units])

    def _clean(self) -> None:
        root = self.root
        for pattern in (
            "var/lib/apt/lists/*_*",
            "var/cache/apt/*.bin",
            "var/cache/apt/archives/*.deb",
            "var/cache/debconf/*-old",
            "var/lib/dpkg/*-old",
            "var/log/apt/*",
            "var/log/*.log",
            "var/tmp/*",
            "tmp/*",
            "root/.bash_history",
        ):
            for path in root.glob(pattern):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()

    def filesystem(self) -> None:
        size = self.recipe.disk_size - PARTITION_START
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
        start = PARTITION_START // SECTOR
        sectors = (disk_size - PARTITION_START) // SECTOR
        script = (
            "label: dos\n"
            f"label-id: 0x{self.disk_id:08x}\n"
            "unit: sectors\n\n"
            f"start={start}, size={sectors}, type=83, bootable\n"
        )
        self._run(
            [self.tools["sfdisk"], "--no-reread", "--no-tell-kernel", "--quiet", str(self.disk)],
            input=script.encode(),
        )
        _copy_sparse(self.partition, self.disk, PARTITION_START)
        self.partition.unlink()

        core_path = self.work / "core.img"
        self._run(
            [
                self.tools["grub-mkimage"],
                "--format=i386-pc",
                f"--directory={GRUB_PLATFORM_DIR}",
                f"--prefix={GRUB_PREFIX}",
                f"--output={core_path}",
                *GRUB_MODULES,
            ]
        )
        boot = bytearray((GRUB_PLATFORM_DIR / "boot.img").read_bytes())
        core = bytearray(core_path.read_bytes())
        install_grub(self.disk, boot, core)

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


def install_grub(disk: Path, boot: bytearray, core: bytearray) -> None:
    """Put GRUB's ``boot.img`` and ``core.img`` on an MBR disk image, like grub-setup.

    ``core.img`` goes to sector 1 onwards (the gap before the first partition
    at 1 MiB); ``boot.img``'s code goes into the MBR's first 440 bytes, keeping
    the disk signature and partition table that sfdisk wrote.
    """
    if len(boot) != SECTOR:
        raise ImageError(f"GRUB boot.img is {len(boot)} bytes, expected {SECTOR}")
    gap = PARTITION_START - SECTOR
    if len(core) > gap:
        raise ImageError(f"GRUB core.img is {len(core)} bytes; it must fit the {gap}-byte gap")
    # boot.img loads core.img's first sector from this LBA (its default is 1 too).
    struct.pack_into("<Q", boot, _BOOT_KERNEL_SECTOR, 1)
    if boot[_BOOT_DRIVE] != 0xFF:
        # 0xff: trust the drive number the BIOS passes in DL (SeaBIOS does it right)
        boot[_BOOT_DRIVE] = 0xFF
    if boot[_BOOT_DRIVE_CHECK] == 0xEB:  # short jmp: as grub-setup does for hard disks
        boot[_BOOT_DRIVE_CHECK : _BOOT_DRIVE_CHECK + 2] = b"\x90\x90"
    # diskboot.img then reads the rest of core.img from LBA 2, contiguously;
    # grub-mkimage already filled in the length.
    (start,) = struct.unpack_from("<Q", core, _DISKBOOT_LIST_START)
    (length,) = struct.unpack_from("<H", core, _DISKBOOT_LIST_START + 8)
    expected = (len(core) + SECTOR - 1) // SECTOR - 1
    if length != expected:
        raise ImageError(
            f"GRUB core.img's blocklist says {length} sectors, expected {expected}; "
            "unsupported grub-mkimage output"
        )
    if start != 2:
        struct.pack_into("<Q", core, _DISKBOOT_LIST_START, 2)
    with open(disk, "rb+") as f:
        mbr = bytearray(f.read(SECTOR))
        if mbr[510:512] != b"\x55\xaa":
            raise ImageError(f"{disk}: no MBR partition table to install GRUB next to")
        mbr[:_BOOT_CODE_END] = boot[:_BOOT_CODE_END]
        f.seek(0)
        f.write(mbr)
        f.seek(SECTOR)
        f.write(core)


def _copy_sparse(src: Path, dst: Path, offset: int) -> None:
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


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Interrupt a child (it got our SIGINT already, if from a terminal) and reap it."""
    for sig, wait in ((signal.SIGINT, 60.0), (signal.SIGTERM, 15.0), (signal.SIGKILL, 15.0)):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path).rstrip("/") + "/"
    found: list[str] = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4:
                    point = re.sub(r"\\(\d{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
                    if point == str(path) or point.startswith(prefix):
                        found.append(point)
    except OSError:
        pass
    return found


def _remove_tree(path: Path, progress: Progress) -> None:
    """Remove the work directory, never crossing into something mounted in it."""
    if not path.exists():
        return
    for point in sorted(_mounts_under(path), key=len, reverse=True):
        # left by an interrupted mmdebstrap (its /dev, /proc, /sys bind mounts)
        subprocess.run(["umount", "--lazy", point], check=False, capture_output=True)
    left = _mounts_under(path)
    if left:
        progress(f"not removing {path}: still mounted there: {', '.join(left)}")
        return
    shutil.rmtree(path, ignore_errors=True)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _write(path: Path, text: str, *, mode: int = 0o644, keep_owner: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    stat = path.stat() if keep_owner and path.exists() else None
    tmp = path.with_name(f".{path.name}.pytest-kvm")
    tmp.write_text(text)
    tmp.chmod(mode)
    if stat is not None:
        os.chown(tmp, stat.st_uid, stat.st_gid)
    os.replace(tmp, path)
