r"""A small bootable install ISO, built from this host's Debian packages for the tests.

The ISO is what a real installer CD is, cut down so that a whole install runs in
a couple of minutes under TCG:

- isolinux (El Torito, no emulation, boot-info-table) loads the host's kernel
  under BIOS; under UEFI, a second El Torito entry (a FAT image with the
  catalog image's own signed shim and GRUB as ``\EFI\BOOT\BOOTX64.EFI``) loads
  the same kernel and an initramfs made here in Python: a newc cpio with the
  static busybox, the kernel modules that see the CD (AHCI or PIIX, sr_mod, isofs), the virtio
  disk, ext4 and vfat, and the few host tools busybox has no good version of
  (``sfdisk``, ``mke2fs``, ``mkfs.fat``, GNU ``tar``, ``zstd``) with their shared
  libraries.
- ``/init`` talks on the serial console: it asks for a host name and a message
  of the day, checks that ``/dev/vda`` exists and is big enough (a clear
  ``ERROR:`` line and power-off if not), partitions it (MBR, one partition from
  1 MiB), makes ext4 with the UUID the image's ``grub.cfg`` and ``fstab`` name,
  extracts the root tarball, writes the answers, puts GRUB's boot code and
  core.img on the disk with ``dd``, prints ``Installation complete`` and powers
  off. Booted under UEFI (``/sys/firmware/efi``), it partitions GPT instead (root
  partition 1 from 32 MiB, an EFI system partition 15 before it, the catalog
  images' layout without the BIOS boot partition), makes the ESP's FAT, copies
  shim, GRUB and the image's ESP ``grub.cfg`` into ``\EFI\debian`` and the
  removable path ``\EFI\BOOT`` (what boots a disk whose firmware has no boot
  entry for it: ``boot_installed()`` starts with fresh UEFI variables), and
  mounts it on ``/boot/efi`` in fstab. It says which firmware and whether it
  sees a TPM.
- The root tarball is the catalog image's root file system, read with
  libguestfs' ``tar_out`` (docs, man pages, locales and apt lists left out) and
  compressed with zstd: as fast to extract under TCG as a plain tar and a third
  of the size (see ``COMPRESSION``).
- GRUB is precomputed on the host exactly as the image builder installs it
  (``grub-mkimage`` + ``install_grub``): the 440 bytes of MBR code and the
  core.img sectors for a disk whose partition starts at 1 MiB.

``build_installer_iso`` builds the ISO once per set of inputs, under a file
lock, into a temporary name that is renamed into place.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pycdlib
from filelock import FileLock

from pytest_kvm import accel
from pytest_kvm.customize import DiskHandle, DiskSource
from pytest_kvm.images import Image, hybrid
from pytest_kvm.images.builder import (
    GRUB_MODULES,
    GRUB_PLATFORM_DIR,
    GRUB_PREFIX,
    PARTITION_START,
    SECTOR,
    install_grub,
)
from pytest_kvm.images.efi import find_esp

__all__ = [
    "BANNER",
    "InstallerUnsupported",
    "boots_under_uefi",
    "build_installer_iso",
    "required_mib",
]

BANNER = "pytest-kvm mini installer"
# Bump when the ISO's content changes for the same inputs (this file's own text
# is part of the key too, so edits to the init script rebuild it).
INSTALLER_FORMAT = 1

ISOLINUX_BIN = Path("/usr/lib/ISOLINUX/isolinux.bin")
LDLINUX_C32 = Path("/usr/lib/syslinux/modules/bios/ldlinux.c32")
BUSYBOX = Path("/bin/busybox")
MKE2FS_CONF = Path("/etc/mke2fs.conf")
# Host tools the init runs, and the Debian package of each (for the error message).
HOST_TOOLS = {
    "sfdisk": "fdisk",
    "mke2fs": "e2fsprogs",
    "tar": "tar",
    "zstd": "zstd",
    "grub-mkimage": "grub-common",
    "modprobe": "kmod",
    "ldd": "libc-bin",
    "mkfs.fat": "dosfstools",
    "mmd": "mtools",
    "mcopy": "mtools",
    "qemu-img": "qemu-utils",
}
INIT_TOOLS = ("sfdisk", "mke2fs", "mkfs.fat", "tar", "zstd")
# Drivers for the CD (q35: AHCI; pc: PIIX), the virtio disk and the root file system.
KERNEL_MODULES = (
    "ahci",
    "ata_piix",
    "sr_mod",
    "isofs",
    "virtio_pci",
    "virtio_blk",
    "ext4",
    "crc32c_generic",
    "vfat",
    "nls_cp437",
    "nls_ascii",
)
# The catalog image's ESP files the CD carries (under ESP_DIR) for a UEFI install.
ESP_FILES = {
    "BOOTX64.EFI": "::/EFI/BOOT/BOOTX64.EFI",  # Debian's signed shim
    "grubx64.efi": "::/EFI/BOOT/grubx64.efi",  # Debian's signed GRUB
    "grub.cfg": "::/EFI/BOOT/grub.cfg",  # finds the root by its UUID
}
ESP_DIR = "esp"
# The El Torito EFI boot image (FAT): big enough for shim, GRUB and the menu.
EFI_IMAGE = "efiboot.img"
EFI_IMAGE_KIB = 8 * 1024
VOLUME_ID = "PYTEST_KVM_INSTALL"
# The UEFI layout: the ESP from 1 MiB, root (partition 1) where the catalog's is.
ESP_START = 1 * 2**20
# Left out of the root tarball: nothing a test looks at, all of it bytes to copy.
ROOT_EXCLUDES = (
    "./usr/share/doc/*",
    "./usr/share/man/*",
    "./usr/share/info/*",
    "./usr/share/locale/*",
    "./usr/share/lintian/*",
    "./var/lib/apt/lists/*",
    "./var/cache/apt/*",
    "./var/cache/debconf/*-old",
    "./var/lib/cloud",
    "./var/log/*.log",
    "./tmp/*",
    "./var/tmp/*",
)
# Measured under TCG (2 vCPUs, the 655 MiB root, on a shared 2-core host, so
# noisy): extracting took 38 to 71 s from a plain tar on the CD, 56 to 69 s from
# zstd (its decompression runs on the second vCPU beside tar), 129 s from gzip
# (busybox). Plain and zstd are a tie within the noise; zstd makes the ISO
# 192 MiB instead of 681 MiB, so it is zstd.
COMPRESSION = "zstd"
ZSTD_LEVEL = 3
# How the init reads the tarball, for each COMPRESSION (busybox has gzip).
UNPACK = {"zstd": "{zstd} -dcq", "gzip": "gzip -dc", "none": "cat"}
# What the installed system needs beyond its files: room to run and install things.
HEADROOM_MIB = 512
TOOL_TIMEOUT = 300.0


class InstallerUnsupported(RuntimeError):
    """The image is not one the mini installer can install (not made by pytest-kvm's
    builder: no ``root=UUID=`` in ``/boot/grub/grub.cfg``)."""


def _say(message: str) -> None:
    """One progress line per phase on stderr: enough for CI logs, no more."""
    print(f"mini-installer: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _phase(name: str) -> Iterator[None]:
    """Report a build phase and its duration."""
    started = time.monotonic()
    yield
    _say(f"{name} ({time.monotonic() - started:.1f}s)")


def _run(argv: list[str], *, input: bytes | None = None, timeout: float = TOOL_TIMEOUT) -> bytes:
    """Run a host tool; its stderr in the exception if it fails."""
    done = subprocess.run(argv, input=input, capture_output=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"{shlex.join(argv)} failed (exit {done.returncode}): "
            f"{done.stderr.decode(errors='replace').strip()[-2000:]}"
        )
    return done.stdout


# -- inputs and the cache key ------------------------------------------------------------


@dataclass(frozen=True)
class HostInputs:
    """The host files the ISO is made from."""

    kernel_version: str
    kernel: Path
    tools: dict[str, str]

    def identity(self) -> list[object]:
        """Cheap identity of every input file: path, size, mtime."""
        files = [self.kernel, ISOLINUX_BIN, LDLINUX_C32, BUSYBOX, MKE2FS_CONF]
        files += [Path(p) for p in self.tools.values()]
        files += [GRUB_PLATFORM_DIR / "boot.img", GRUB_PLATFORM_DIR / "kernel.img"]
        ident: list[object] = [self.kernel_version]
        for path in files:
            st = path.stat()
            ident.append((str(path), st.st_size, st.st_mtime_ns))
        return ident


def host_inputs() -> HostInputs:
    """Find the host kernel and tools, or say which Debian package is missing."""
    missing = [
        f"{tool} (apt-get install {package})"
        for tool, package in HOST_TOOLS.items()
        if _which(tool) is None
    ]
    for path, package in (
        (ISOLINUX_BIN, "isolinux"),
        (LDLINUX_C32, "syslinux-common"),
        (BUSYBOX, "busybox-static"),
        (GRUB_PLATFORM_DIR / "boot.img", "grub-pc-bin"),
    ):
        if not path.is_file():
            missing.append(f"{path} (apt-get install {package})")
    kernels = [
        k
        for k in sorted(Path("/boot").glob("vmlinuz-*"))
        if (Path("/lib/modules") / k.name.removeprefix("vmlinuz-") / "modules.dep").is_file()
    ]
    if not kernels:
        missing.append("a kernel in /boot with its modules (apt-get install linux-image-amd64)")
    if missing:
        raise RuntimeError("cannot build the mini installer, missing: " + "; ".join(missing))
    if not _is_static(BUSYBOX):
        raise RuntimeError(f"{BUSYBOX} is not static (apt-get install busybox-static)")
    # mtools is one binary that acts on the name it was run as: keep the link.
    tools = {
        tool: str(_which(tool, resolve=package != "mtools")) for tool, package in HOST_TOOLS.items()
    }
    kernel = kernels[-1]
    return HostInputs(kernel.name.removeprefix("vmlinuz-"), kernel, tools)


def _which(tool: str, *, resolve: bool = True) -> str | None:
    """``shutil.which`` that also looks in the sbin directories (not in root's PATH on CI)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin", "/bin"])
    found = shutil.which(tool, path=path)
    return os.path.realpath(found) if found and resolve else found


def _is_static(binary: Path) -> bool:
    """A static binary has no PT_INTERP: ldd says so."""
    done = subprocess.run(["ldd", str(binary)], capture_output=True, timeout=30, check=False)
    return done.returncode != 0 or b"not a dynamic executable" in done.stdout + done.stderr


def _cache_key(inputs: HostInputs, image: Image) -> str:
    """Everything the ISO depends on: this file, the host inputs, the image file."""
    digest = hashlib.sha256()
    digest.update(Path(__file__).read_bytes())
    st = image.path.stat()
    for part in (
        INSTALLER_FORMAT,
        COMPRESSION,
        ZSTD_LEVEL,
        inputs.identity(),
        (str(image.path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino),
    ):
        digest.update(repr(part).encode())
    return digest.hexdigest()[:16]


# -- the public entry point --------------------------------------------------------------


def build_installer_iso(cache_dir: Path, image: Image, *, force_tcg: bool | None = None) -> Path:
    """The mini installer ISO for ``image``, built once per inputs under ``cache_dir``.

    Several pytest processes asking at once build it once (file lock); the ISO
    appears only complete (a temporary name, then a rename). ``force_tcg``: how
    libguestfs runs; ``None`` asks the plugin's accelerator probe.
    """
    inputs = host_inputs()
    out_dir = Path(cache_dir) / "installer"
    out_dir.mkdir(parents=True, exist_ok=True)
    iso = out_dir / f"mini-installer-{image.name}-{_cache_key(inputs, image)}.iso"
    if iso.is_file():
        return iso
    with FileLock(str(iso) + ".lock"):
        if iso.is_file():
            return iso
        if force_tcg is None:
            force_tcg = accel.choose("auto").name != "kvm"
        started = time.monotonic()
        _say(f"building {iso.name} from {image.name} and kernel {inputs.kernel_version}")
        work = Path(tempfile.mkdtemp(prefix=f".{iso.name}.", dir=out_dir))
        try:
            _build(inputs, image, work, force_tcg)
            os.replace(work / "installer.iso", iso)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        _say(
            f"built {iso} ({iso.stat().st_size / 2**20:.0f} MiB) "
            f"in {time.monotonic() - started:.1f}s"
        )
    return iso


def required_mib(unpacked_bytes: int, entries: int) -> int:
    """The disk size the installer asks for: the files in 4 KiB blocks, ext4's own
    metadata (a tenth), what comes before the root partition (1 MiB under BIOS,
    the ESP's 32 MiB under UEFI: the larger, for both), and headroom to run."""
    blocks = unpacked_bytes + entries * 4096
    need = hybrid.ROOT_START / 2**20 + blocks * 1.1 / 2**20 + HEADROOM_MIB
    return int(-(-need // 64) * 64)


# -- the build -------------------------------------------------------------------------


@dataclass
class RootFacts:
    """What the image's root file system says that the installer must agree with."""

    uuid: str
    unpacked_bytes: int = 0
    entries: int = 0


def _build(inputs: HostInputs, image: Image, work: Path, force_tcg: bool) -> None:
    """All phases, in ``work``; the result is ``work / "installer.iso"``."""
    with _phase("root file system read with libguestfs tar_out"):
        tar, facts = _export_root(image, work, force_tcg)
    with _phase(f"root tarball compressed with {COMPRESSION}"):
        facts.unpacked_bytes, facts.entries = _tar_size(tar)
        archive = _compress(tar, inputs)
    with _phase("GRUB boot code and core.img"):
        boot_code, core = _grub_sectors(inputs, work)
    with _phase("the image's EFI system partition read with qemu-img and mtools"):
        esp = _image_esp_files(inputs, image, work)
    with _phase("initramfs"):
        initrd = _initramfs(inputs, facts, archive.name)
    with _phase("ISO written with pycdlib"):
        files = {
            "isolinux/isolinux.bin": ISOLINUX_BIN.read_bytes(),
            "isolinux/ldlinux.c32": LDLINUX_C32.read_bytes(),
            "isolinux/isolinux.cfg": _isolinux_cfg().encode(),
            "vmlinuz": inputs.kernel.read_bytes(),
            "initrd.gz": initrd,
            "grub/boot.bin": boot_code,
            "grub/core.bin": core,
        }
        if esp:
            menu = _cd_grub_cfg().encode()
            files |= {f"{ESP_DIR}/{name}": data for name, data in esp.items()}
            # Wherever Debian's signed GRUB looks first (its prefix /EFI/debian on
            # the device it came from, else /boot/grub): the same menu.
            files |= {"EFI/debian/grub.cfg": menu, "boot/grub/grub.cfg": menu}
            files[EFI_IMAGE] = _efi_boot_image(inputs, esp, menu, work)
        _write_iso(work / "installer.iso", files, archive, efi=bool(esp))


def _export_root(image: Image, work: Path, force_tcg: bool) -> tuple[Path, RootFacts]:
    """The image's root as an uncompressed tar, and the UUID its boot files use."""
    tar = work / "root.tar"
    with DiskHandle(
        DiskSource.of(image), readonly=True, force_tcg=force_tcg, what=f"image {image.name}"
    ) as disk:
        g = disk.g
        grub_cfg = g.cat("/boot/grub/grub.cfg") if g.is_file("/boot/grub/grub.cfg") else ""
        fstab = g.cat("/etc/fstab")
        g.tar_out("/", str(tar), numericowner=True, excludes=list(ROOT_EXCLUDES))
    return tar, _root_facts(image, grub_cfg, fstab)


def _root_facts(image: Image, grub_cfg: str, fstab: str) -> RootFacts:
    """The root UUID from grub.cfg's ``root=UUID=`` (the installer makes the new
    file system with it, so grub.cfg and fstab stay right), checked against fstab."""
    match = re.search(r"^\s*linux\s+\S+\s.*\broot=UUID=([0-9a-fA-F-]{36})\b", grub_cfg, re.M)
    if match is None:
        raise InstallerUnsupported(
            f"image {image.name}: /boot/grub/grub.cfg has no 'linux ... root=UUID=' line; "
            "the mini installer supports images made by pytest-kvm's builder"
        )
    uuid = match.group(1).lower()
    if not re.search(rf"^UUID={uuid}\s+/\s", fstab, re.M | re.I):
        raise RuntimeError(f"image {image.name}: /etc/fstab does not mount UUID={uuid} on /")
    return RootFacts(uuid=uuid)


def _image_esp_files(inputs: HostInputs, image: Image, work: Path) -> dict[str, bytes]:
    """Shim, GRUB and grub.cfg from the image's ESP (a hybrid catalog image has one,
    see ``pytest_kvm.images.hybrid``); {} when it has none: the ISO is BIOS-only."""
    if image.is_encrypted:
        return {}
    qemu_img = inputs.tools["qemu-img"]

    def dd(out: Path, skip: int, count: int) -> bytes:
        argv = [qemu_img, "dd", "-f", image.format, "-O", "raw", f"bs={SECTOR}"]
        _run([*argv, f"skip={skip}", f"count={count}", f"if={image.path}", f"of={out}"])
        return out.read_bytes() if count <= 64 else b""

    found = find_esp(dd(work / "gpt-head", 0, 34))
    if found is None:
        _say(f"{image.name} has no EFI system partition: the ISO boots under BIOS only")
        return {}
    first, last = found
    fat = work / "image-esp.fat"
    dd(fat, first, last - first + 1)
    files: dict[str, bytes] = {}
    for name, source in ESP_FILES.items():
        out = work / f"esp-{name}"
        _run([inputs.tools["mcopy"], "-n", "-i", str(fat), source, str(out)])
        files[name] = out.read_bytes()
    fat.unlink()
    return files


def _cd_grub_cfg() -> str:
    """The CD's GRUB menu under UEFI: the installer at once, on the serial console."""
    return (
        "# Written by tests/integration/support/mini_installer.py\n"
        f"search --no-floppy --label --set=root {VOLUME_ID}\n"
        "set default=0\n"
        "set timeout=0\n"
        "menuentry 'pytest-kvm mini installer' {\n"
        "\tlinux ($root)/vmlinuz console=ttyS0,115200n8 no_timer_check quiet loglevel=3\n"
        "\tinitrd ($root)/initrd.gz\n"
        "}\n"
    )


def _efi_boot_image(inputs: HostInputs, esp: dict[str, bytes], menu: bytes, work: Path) -> bytes:
    """The El Torito EFI boot image: a FAT file system holding the removable path
    ``\\EFI\\BOOT\\BOOTX64.EFI`` (shim), shim's ``grubx64.efi`` and the CD's menu."""
    fat = work / EFI_IMAGE
    _run([inputs.tools["mkfs.fat"], "-C", "-n", "PKVM_EFI", str(fat), str(EFI_IMAGE_KIB)])
    image = f"-i{fat}"
    _run([inputs.tools["mmd"], image, "::/EFI", "::/EFI/BOOT", "::/EFI/debian"])
    for name, target in (
        ("BOOTX64.EFI", "::/EFI/BOOT/BOOTX64.EFI"),
        ("grubx64.efi", "::/EFI/BOOT/grubx64.efi"),
        ("menu", "::/EFI/BOOT/grub.cfg"),
        ("menu", "::/EFI/debian/grub.cfg"),
    ):
        source = work / f"efiboot-{name}"
        source.write_bytes(menu if name == "menu" else esp[name])
        _run([inputs.tools["mcopy"], image, str(source), target])
    return fat.read_bytes()


def boots_under_uefi(iso: Path) -> bool:
    """Whether the ISO has the El Torito EFI entry (made from an image with an ESP)."""
    cd = pycdlib.PyCdlib()
    cd.open(str(iso))
    try:
        cd.get_record(iso_path=_iso_name(EFI_IMAGE))
    except pycdlib.pycdlibexception.PyCdlibInvalidInput:
        return False
    finally:
        cd.close()
    return True


def _tar_size(tar: Path) -> tuple[int, int]:
    """Bytes of file data and number of entries: what the disk must hold."""
    size = entries = 0
    with tarfile.open(tar) as archive:
        for member in archive:
            entries += 1
            if member.isfile():
                size += member.size
    return size, entries


def _compress(tar: Path, inputs: HostInputs) -> Path:
    """The tarball as it goes on the CD (``COMPRESSION``); the plain tar is removed."""
    if COMPRESSION == "none":
        return tar
    if COMPRESSION == "gzip":
        out = tar.with_name(tar.name + ".gz")
        with open(out, "wb") as f:
            subprocess.run(["gzip", "-6", "-c", str(tar)], stdout=f, check=True, timeout=600)
    else:
        out = tar.with_name(tar.name + ".zst")
        argv = [inputs.tools["zstd"], "-q", f"-{ZSTD_LEVEL}", "-T0", "-o", str(out), str(tar)]
        _run(argv, timeout=600)
    tar.unlink()
    return out


def _grub_sectors(inputs: HostInputs, work: Path) -> tuple[bytes, bytes]:
    """What grub-setup would write on a disk whose partition starts at 1 MiB: the
    MBR's first 440 bytes and the sectors from LBA 1. The same modules and prefix
    as the image builder, through its own ``install_grub`` on a scratch disk."""
    core_path = work / "core.img"
    _run(
        [
            inputs.tools["grub-mkimage"],
            "--format=i386-pc",
            f"--directory={GRUB_PLATFORM_DIR}",
            f"--prefix={GRUB_PREFIX}",
            f"--output={core_path}",
            *GRUB_MODULES,
        ]
    )
    core = bytearray(core_path.read_bytes())
    scratch = work / "grub-scratch.img"
    with open(scratch, "wb") as f:
        f.truncate(PARTITION_START)
        f.seek(510)
        f.write(b"\x55\xaa")  # install_grub wants an MBR to write next to
    install_grub(scratch, bytearray((GRUB_PLATFORM_DIR / "boot.img").read_bytes()), core)
    data = scratch.read_bytes()
    sectors = -(-len(core) // SECTOR)
    return data[:440], data[SECTOR : SECTOR * (1 + sectors)]


# -- the initramfs -----------------------------------------------------------------------


@dataclass
class Cpio:
    """A newc cpio archive in memory: the kernel's initramfs format."""

    out: io.BytesIO = field(default_factory=io.BytesIO)
    dirs: set[str] = field(default_factory=set)
    ino: int = 1

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
        self.ino += 1
        header = b"070701" + b"".join(b"%08X" % v for v in fields)
        self.out.write(header + name.encode() + b"\0")
        self.out.write(b"\0" * (-self.out.tell() % 4))
        self.out.write(data)
        self.out.write(b"\0" * (-self.out.tell() % 4))

    def mkdir(self, path: str) -> None:
        """A directory and its parents (the kernel does not make missing parents)."""
        path = path.strip("/")
        if not path or path in self.dirs:
            return
        self.mkdir(os.path.dirname(path))
        self.dirs.add(path)
        self._entry(path, stat.S_IFDIR | 0o755)

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        self.mkdir(os.path.dirname(path.strip("/")))
        self._entry(path.strip("/"), stat.S_IFREG | mode, data)

    def symlink(self, path: str, target: str) -> None:
        self.mkdir(os.path.dirname(path.strip("/")))
        self._entry(path.strip("/"), stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, path: str, major: int, minor: int) -> None:
        self.mkdir(os.path.dirname(path.strip("/")))
        self._entry(path.strip("/"), stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.out.getvalue()


def _shared_libraries(binary: str) -> list[str]:
    """The loader and libraries ``binary`` needs, as ldd names them (those paths
    are where the loader looks, whatever symlinks lead there on the host)."""
    output = _run(["ldd", binary], timeout=30).decode()
    libs = []
    for line in output.splitlines():
        match = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
        if match:
            libs.append(match.group(1))
    return libs


def _module_files(version: str) -> list[str]:
    """The ``.ko`` files for ``KERNEL_MODULES`` with their dependencies, in load order."""
    output = _run(["modprobe", "-a", "--show-depends", "-S", version, *KERNEL_MODULES]).decode()
    paths: list[str] = []
    for line in output.splitlines():
        parts = line.split()
        if parts[:1] == ["insmod"] and parts[1] not in paths:
            if not parts[1].endswith(".ko"):
                raise RuntimeError(f"{parts[1]}: compressed kernel modules are not supported")
            paths.append(parts[1])
    return paths


def _initramfs(inputs: HostInputs, facts: RootFacts, archive_name: str) -> bytes:
    """busybox, modules, tools with their libraries, ``/init``: gzip'd newc cpio."""
    cpio = Cpio()
    for directory in ("dev", "proc", "sys", "tmp", "cdrom", "target", "etc", "sbin"):
        cpio.mkdir(directory)
    cpio.chardev("dev/console", 5, 1)
    cpio.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.file("etc/mke2fs.conf", MKE2FS_CONF.read_bytes())
    done: set[str] = set()
    for tool in INIT_TOOLS:
        binary = inputs.tools[tool]
        for path in [binary, *_shared_libraries(binary)]:
            if path not in done:
                done.add(path)
                cpio.file(path, Path(path).read_bytes(), 0o755)
    modules = _module_files(inputs.kernel_version)
    for path in modules:
        cpio.file(path, Path(path).read_bytes())
    cpio.file("init", _init_script(inputs, facts, archive_name, modules).encode(), 0o755)
    return gzip.compress(cpio.finish(), compresslevel=6, mtime=0)


def _isolinux_cfg() -> str:
    """Boot straight into the installer, on the serial console."""
    return (
        "SERIAL 0 115200\n"
        "DEFAULT install\n"
        "PROMPT 0\n"
        "TIMEOUT 0\n"
        "LABEL install\n"
        "  KERNEL /vmlinuz\n"
        "  INITRD /initrd.gz\n"
        "  APPEND console=ttyS0,115200n8 no_timer_check quiet loglevel=3\n"
    )


def _init_script(
    inputs: HostInputs, facts: RootFacts, archive_name: str, modules: list[str]
) -> str:
    """The installer itself: a busybox shell script run as PID 1."""
    need = required_mib(facts.unpacked_bytes, facts.entries)
    values = {
        "BANNER": BANNER,
        "NEED_MIB": str(need),
        "ROOT_UUID": facts.uuid,
        "ARCHIVE": f"/cdrom/{archive_name}",
        "UNPACKED_MIB": str(facts.unpacked_bytes // 2**20),
        "MODULES": " ".join(modules),
        "SFDISK": inputs.tools["sfdisk"],
        "MKE2FS": inputs.tools["mke2fs"],
        "TAR": inputs.tools["tar"],
        "UNPACK": UNPACK[COMPRESSION].format(zstd=inputs.tools["zstd"]),
        "PART_START": str(PARTITION_START // SECTOR),
        "MKFS_FAT": inputs.tools["mkfs.fat"],
        "ESP_DIR": f"/cdrom/{ESP_DIR}",
        "ESP_START": str(ESP_START // SECTOR),
        "ESP_SECTORS": str((hybrid.ROOT_START - ESP_START) // SECTOR),
        "ROOT_START": str(hybrid.ROOT_START // SECTOR),
        "ESP_TYPE": hybrid.ESP_TYPE,
        "LINUX_TYPE": hybrid.LINUX_TYPE,
        # The FAT serial number (fstab's UUID=XXXX-XXXX): from the root's UUID.
        "ESP_SERIAL": facts.uuid.replace("-", "")[:8],
    }
    head = "".join(f"{key}={shlex.quote(value)}\n" for key, value in values.items())
    return "#!/bin/sh\n# Generated by tests/integration/mini_installer.py\n" + head + INIT_BODY


INIT_BODY = r"""
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
set -o pipefail

say() { echo "installer: [$(cut -d' ' -f1 /proc/uptime)s] $*"; }
halt() { sync; sleep 1; poweroff -f; sleep 60; }
die() { echo "ERROR: $*"; halt; }

wait_for() {  # wait_for PATH SECONDS
    n=0
    while [ ! -e "$1" ] && [ "$n" -lt "$(($2 * 10))" ]; do sleep 0.1; n=$((n + 1)); done
    [ -e "$1" ]
}

ask_hostname() {
    while :; do
        printf 'Hostname: '
        read -r HOST || die "no answer on the console"
        case "$HOST" in
            ""|-*|*-|*[!A-Za-z0-9.-]*) echo "a host name is letters, digits, dots and dashes" ;;
            *) [ "${#HOST}" -le 63 ] && return; echo "at most 63 characters" ;;
        esac
    done
}

echo
echo "$BANNER"
say "loading drivers"
for m in $MODULES; do insmod "$m" 2>/dev/null; done

if [ -d /sys/firmware/efi ]; then FIRMWARE=uefi; else FIRMWARE=bios; fi
say "firmware: $FIRMWARE"
if [ -e /sys/class/tpm/tpm0 ]; then
    TPM_MAJOR=$(cat /sys/class/tpm/tpm0/tpm_version_major 2>/dev/null || echo '?')
    say "TPM $TPM_MAJOR.0 found: /dev/tpm0"
fi

say "looking for the disk"
wait_for /sys/block/vda 10 || die "no disk: /dev/vda not found (the installer needs a virtio disk)"
wait_for /dev/vda 5 || die "no disk: /dev/vda has no device node"
HAVE_MIB=$(($(cat /sys/block/vda/size) / 2048))
[ "$HAVE_MIB" -ge "$NEED_MIB" ] ||
    die "disk too small: /dev/vda has $HAVE_MIB MiB, the system needs $NEED_MIB MiB"
say "disk /dev/vda: $HAVE_MIB MiB"

wait_for /dev/sr0 10 || die "the install CD (/dev/sr0) was not found"
mount -t iso9660 -o ro /dev/sr0 /cdrom || die "cannot mount the install CD"
[ -f "$ARCHIVE" ] || die "$ARCHIVE is not on the install CD"
[ "$FIRMWARE" = bios ] || [ -f "$ESP_DIR/BOOTX64.EFI" ] ||
    die "this install CD has no UEFI boot loader to install ($ESP_DIR is missing)"

ask_hostname
printf 'Message of the day: '
read -r MOTD || die "no answer on the console"

say "partitioning /dev/vda"
if [ "$FIRMWARE" = uefi ]; then
    # GPT: root is partition 1 from 32 MiB, the EFI system partition 15 before it.
    {
        printf 'label: gpt\n'
        printf '/dev/vda1 : start=%s, type=%s, name=root\n' "$ROOT_START" "$LINUX_TYPE"
        printf '/dev/vda15 : start=%s, size=%s, type=%s, name=esp\n' \
            "$ESP_START" "$ESP_SECTORS" "$ESP_TYPE"
    } | "$SFDISK" --quiet --wipe always /dev/vda >/dev/null || die "sfdisk failed"
    wait_for /dev/vda15 10 || die "/dev/vda15 did not appear after partitioning"
else
    printf 'label: dos\nstart=%s, type=83, bootable\n' "$PART_START" \
        | "$SFDISK" --quiet --wipe always /dev/vda >/dev/null || die "sfdisk failed"
fi
wait_for /dev/vda1 10 || die "/dev/vda1 did not appear after partitioning"

say "making the ext4 file system"
"$MKE2FS" -q -F -t ext4 -U "$ROOT_UUID" -L root \
    -E lazy_itable_init=0,lazy_journal_init=0 /dev/vda1 || die "mke2fs failed"
mount -t ext4 -o noatime /dev/vda1 /target || die "cannot mount /dev/vda1"

say "copying the system ($UNPACKED_MIB MiB)"
$UNPACK "$ARCHIVE" | "$TAR" -x -p --numeric-owner -C /target -f - -b 2048 -B \
    --checkpoint=100 --checkpoint-action="echo=copied %u of $UNPACKED_MIB MiB" \
    || die "extracting the system failed"

say "configuring"
printf '%s\n' "$HOST" >/target/etc/hostname
sed -i "s/^127\.0\.1\.1[[:space:]].*/127.0.1.1\t$HOST/" /target/etc/hosts
printf '%s\n' "$MOTD" >/target/etc/motd
printf '# Written by the pytest-kvm mini installer.\nUUID=%s\t/\text4\terrors=remount-ro\t0\t1\n' \
    "$ROOT_UUID" >/target/etc/fstab
if [ "$FIRMWARE" = uefi ]; then
    FAT_UUID=$(echo "$ESP_SERIAL" | sed 's/^\(....\)/\1-/' | tr a-f A-F)
    printf 'UUID=%s\t/boot/efi\tvfat\tumask=0077\t0\t1\n' "$FAT_UUID" >>/target/etc/fstab
fi
: >/target/etc/machine-id
rm -rf /target/var/lib/cloud /target/etc/ssh/ssh_host_*

if [ "$FIRMWARE" = uefi ]; then
    say "installing GRUB for UEFI (shim) on /dev/vda15"
    "$MKFS_FAT" -n ESP -i "$ESP_SERIAL" /dev/vda15 >/dev/null || die "mkfs.fat failed"
    mkdir -p /target/boot/efi
    mount -t vfat /dev/vda15 /target/boot/efi || die "cannot mount the ESP /dev/vda15"
    # Debian's own place, and the removable path that firmware without a boot entry
    # for this disk (a new machine, fresh variables) boots: grub-install's
    # --force-extra-removable.
    for dir in EFI/debian EFI/BOOT; do
        mkdir -p "/target/boot/efi/$dir" || die "cannot make $dir on the ESP"
        cp "$ESP_DIR/grubx64.efi" "$ESP_DIR/grub.cfg" "/target/boot/efi/$dir/" ||
            die "copying GRUB to $dir failed"
    done
    cp "$ESP_DIR/BOOTX64.EFI" /target/boot/efi/EFI/debian/shimx64.efi &&
        cp "$ESP_DIR/BOOTX64.EFI" /target/boot/efi/EFI/BOOT/BOOTX64.EFI ||
        die "copying shim failed"
    umount /target/boot/efi || die "cannot unmount the ESP"
else
    say "installing GRUB"
    # boot.img's code into the MBR (its partition table stays), core.img from sector 1.
    dd if=/cdrom/grub/boot.bin of=/dev/vda bs=440 count=1 conv=notrunc 2>/dev/null ||
        die "writing GRUB's boot code to the MBR failed"
    dd if=/cdrom/grub/core.bin of=/dev/vda bs=512 seek=1 conv=notrunc 2>/dev/null ||
        die "writing GRUB's core.img failed"
fi

say "syncing"
sync
umount /target || die "cannot unmount /target"
umount /cdrom
sync
echo "Installation complete"
halt
"""


# -- the ISO ------------------------------------------------------------------------------


def _iso_name(path: str) -> str:
    """ISO 9660 level 3 name for ``path``: upper case, dots kept, ``;1``."""
    *dirs, name = path.upper().replace("-", "_").split("/")
    base, dot, ext = name.rpartition(".")
    name = f"{base.replace('.', '_')}.{ext}" if dot else f"{name}."
    return "/" + "/".join([*dirs, name]) + ";1"


def _write_iso(out: Path, files: dict[str, bytes], archive: Path, *, efi: bool) -> None:
    """The CD: isolinux as its El Torito boot image (and ``EFI_IMAGE`` as its EFI
    one when ``efi``), Rock Ridge names for Linux."""
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, rock_ridge="1.09", vol_ident=VOLUME_ID)
    try:
        made: set[str] = set()
        for path in [*files, "isolinux/boot.cat"]:
            parent = os.path.dirname(path)
            parts = parent.split("/") if parent else []
            for depth in range(1, len(parts) + 1):
                directory = "/".join(parts[:depth])
                if directory not in made:
                    made.add(directory)
                    iso.add_directory("/" + directory.upper(), rr_name=parts[depth - 1])
        for path, data in files.items():
            iso.add_fp(io.BytesIO(data), len(data), _iso_name(path), rr_name=os.path.basename(path))
        iso.add_file(str(archive), _iso_name(archive.name), rr_name=archive.name)
        iso.add_eltorito(
            _iso_name("isolinux/isolinux.bin"),
            bootcatfile=_iso_name("isolinux/boot.cat"),
            boot_load_size=4,
            boot_info_table=True,
            media_name="noemul",
        )
        if efi:
            iso.add_eltorito(
                _iso_name(EFI_IMAGE),
                bootcatfile=_iso_name("isolinux/boot.cat"),
                platform_id=0xEF,
                efi=True,
                media_name="noemul",
            )
        iso.write(str(out))
    finally:
        iso.close()
