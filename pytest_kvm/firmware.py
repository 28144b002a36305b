"""The guest's firmware (``--kvm-firmware``): SeaBIOS, or OVMF with a variables file
of the guest's own, with or without Secure Boot; on arm64 guests AAVMF (UEFI), on
riscv64 guests OpenSBI with U-Boot. Values, the firmware files and QEMU's options;
which image can boot what is in :mod:`pytest_kvm.images.efi`.

What each architecture boots with (``auto`` is the first):

- x86_64: ``bios`` (SeaBIOS; what every image boots), ``uefi``, ``uefi-secure`` (OVMF)
- aarch64: ``uefi`` only (AAVMF, Debian's ``qemu-efi-aarch64``): the virt machine has
  no BIOS, and AAVMF's Secure Boot is not protected without SMM, which arm lacks
- riscv64: ``u-boot`` only (OpenSBI's ``fw_jump`` as ``-bios``, U-Boot in S-mode as
  its payload, booting the disk: Debian's ``opensbi`` and ``u-boot-qemu``)

Each UEFI guest gets a copy of a variables file (``efivars.fd`` in its directory):
the shared template in ``/usr/share/OVMF`` is never opened for writing. A template
keeps its copy; each clone gets a copy of the template's (QEMU also carries the
flash contents in the migration stream and writes them back to the clone's file).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import KvmConfigError

FIRMWARES = ("auto", "bios", "uefi", "uefi-secure", "u-boot")
#: What ``auto`` means on x86_64: what every image boots (hybrid images boot BIOS first).
DEFAULT = "bios"
#: Per architecture, what it can boot with; the first is what ``auto`` means.
ARCH_FIRMWARES = {
    "x86_64": ("bios", "uefi", "uefi-secure"),
    "aarch64": ("uefi",),
    "riscv64": ("u-boot",),
}
OVMF_DIR = Path(os.environ.get("PYTEST_KVM_OVMF_DIR", "/usr/share/OVMF"))
AAVMF_DIR = Path(os.environ.get("PYTEST_KVM_AAVMF_DIR", "/usr/share/AAVMF"))
OPENSBI = Path(
    os.environ.get("PYTEST_KVM_OPENSBI", "/usr/lib/riscv64-linux-gnu/opensbi/generic/fw_jump.elf")
)
UBOOT = Path(os.environ.get("PYTEST_KVM_UBOOT", "/usr/lib/u-boot/qemu-riscv64_smode/u-boot.bin"))
#: The guest's own copy of the variables, next to its disk.
VARS_NAME = "efivars.fd"


def parse_firmware(value: Any, where: str) -> str:
    """One of :data:`FIRMWARES`, or a one-line error naming the value and ``where``."""
    text = value.strip().lower() if isinstance(value, str) else value
    if text not in FIRMWARES:
        raise KvmConfigError(f"{where}: {value!r} is not one of {', '.join(FIRMWARES)}")
    return str(text)


def resolve(name: str, arch: str = "x86_64") -> str:
    """``auto`` as what it means for ``arch``: BIOS on x86_64, UEFI on aarch64, U-Boot
    on riscv64; any other name as it is (see :func:`arch_refusal`)."""
    return ARCH_FIRMWARES.get(arch, (DEFAULT,))[0] if name == "auto" else name


def arch_refusal(name: str, arch: str) -> str:
    """ "" if a guest of ``arch`` can boot with firmware ``name`` (resolved), else why
    not, in a few words."""
    allowed = ARCH_FIRMWARES.get(arch, ())
    if name in allowed:
        return ""
    return (
        f"{arch} guests boot with {' or '.join(repr(a) for a in allowed) or 'nothing known'}"
        f", not {name!r}"
    )


@dataclass(frozen=True)
class Ovmf:
    """UEFI's code (read-only, shared) and the variables template each guest copies:
    OVMF for x86_64 guests, AAVMF for aarch64 ones (both as pflash)."""

    name: str  # "uefi" | "uefi-secure"
    code: Path
    vars: Path
    secure: bool

    @classmethod
    def find(cls, name: str, directory: Path | None = None, arch: str = "x86_64") -> Ovmf:
        """The files for ``name``; a one-line error naming Debian's package if missing."""
        secure = name == "uefi-secure"
        if arch == "aarch64":
            directory = directory or AAVMF_DIR
            what, package = "AAVMF", "qemu-efi-aarch64"
            code, variables = "AAVMF_CODE.fd", "AAVMF_VARS.fd"
        elif secure:
            directory = directory or OVMF_DIR
            what, package = "OVMF", "ovmf"
            code, variables = "OVMF_CODE_4M.secboot.fd", "OVMF_VARS_4M.ms.fd"
        else:
            directory = directory or OVMF_DIR
            what, package = "OVMF", "ovmf"
            code, variables = "OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd"
        found = cls(name, directory / code, directory / variables, secure)
        missing = [str(p) for p in (found.code, found.vars) if not p.is_file()]
        if missing:
            raise KvmConfigError(
                f"firmware {name!r} of {arch} guests needs {what}: {', '.join(missing)} "
                f"missing (Debian package {package}: apt-get install {package})"
            )
        return found

    def copy_vars(self, dest: Path, source: Path | None = None) -> Path:
        """A private copy of the variables (of ``source``, a template's, if given)."""
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.copyfile(source or self.vars, tmp)
        tmp.chmod(0o600)
        os.replace(tmp, dest)
        return dest

    def qemu_args(self, variables: Path | None, direct_kernel: bool = False) -> list[str]:
        """QEMU options for this firmware with ``variables`` as the guest's own flash."""
        del direct_kernel  # UEFI loads a kernel QEMU is given (fw_cfg) itself
        args = []
        if self.secure:
            # Secure Boot's variables are only safe from the OS with SMM.
            args += [
                "-machine",
                "smm=on",
                "-global",
                "driver=cfi.pflash01,property=secure,value=on",
            ]
        args += [
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={self.code}",
            "-drive", f"if=pflash,format=raw,unit=1,file={variables}",
        ]  # fmt: skip
        return args


@dataclass(frozen=True)
class UBoot:
    """riscv64's boot chain: OpenSBI (M-mode, ``-bios``) jumping to U-Boot (S-mode,
    ``-kernel``), which boots the disk (extlinux.conf or EFI). Nothing per guest."""

    opensbi: Path
    uboot: Path
    name: str = "u-boot"
    secure: bool = False

    @classmethod
    def find(cls, opensbi: Path | None = None, uboot: Path | None = None) -> UBoot:
        """The files; a one-line error naming the Debian package of the one missing."""
        found = cls(opensbi or OPENSBI, uboot or UBOOT)
        for path, package in ((found.opensbi, "opensbi"), (found.uboot, "u-boot-qemu")):
            if not path.is_file():
                raise KvmConfigError(
                    f"firmware 'u-boot' of riscv64 guests needs {path}, which is missing "
                    f"(Debian package {package}: apt-get install {package})"
                )
        return found

    def qemu_args(self, variables: Path | None = None, direct_kernel: bool = False) -> list[str]:
        """OpenSBI as the firmware; U-Boot as what it starts, unless QEMU is given a
        kernel to boot directly (``kernel_args``), which OpenSBI then starts."""
        del variables  # U-Boot keeps no variables of the guest's
        args = ["-bios", str(self.opensbi)]
        if not direct_kernel:
            args += ["-kernel", str(self.uboot)]
        return args


#: What a guest's ``MachineSpec.firmware`` holds: None is SeaBIOS (x86_64).
Firmware = Ovmf | UBoot
