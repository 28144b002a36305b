"""Guest architectures (``--kvm-arch``, ``guest.arch``): each one's QEMU binary and
the Debian package that has it, its machine and TCG CPU model, its serial console and
how much slower it runs than a guest of the host's architecture. Pure values; which
architecture an image is, is found in :mod:`pytest_kvm.imagearch`.

Names are the kernel's (``uname -m``): ``x86_64``, ``aarch64``, ``riscv64``. Debian's
names (``amd64``, ``arm64``) are accepted as aliases wherever a user gives one.
"""

from __future__ import annotations

import platform
import shutil
from dataclasses import dataclass
from typing import Any

from .errors import KvmConfigError, KvmUnavailable

#: What ``--kvm-arch`` takes: ``auto`` (the image's own) or an architecture.
AUTO = "auto"


@dataclass(frozen=True)
class Arch:
    """One guest architecture as QEMU runs it here."""

    name: str  # uname -m: "x86_64", "aarch64", "riscv64"
    debian: str  # dpkg's name: "amd64", "arm64", "riscv64"
    qemu: str  # the qemu-system-* binary
    package: str  # Debian's package with that binary
    machine: str  # -machine
    tcg_cpu: str  # -cpu under TCG
    console: str  # the kernel's name of the first serial port (console=)
    efi_boot: str  # the removable-media boot file on an ESP (\EFI\BOOT\...)
    pe_machine: int  # IMAGE_FILE_MACHINE_* of its EFI binaries
    # Boot and command waits are multiplied by this on top of the accelerator's scale
    # when the architecture is not the host's (TCG translating another instruction set
    # is slower than TCG running the host's own; see bench/RESULTS.md).
    foreign_slowdown: float

    def is_host(self) -> bool:
        return self.name == host_arch()


ARCHES: dict[str, Arch] = {
    a.name: a
    for a in (
        Arch("x86_64", "amd64", "qemu-system-x86_64", "qemu-system-x86", "q35", "max",
             "ttyS0", "BOOTX64.EFI", 0x8664, 2.0),
        # cortex-a72 over max: measured faster to SSH-ready under TCG here (max emulates
        # pointer authentication with QARMA, the costliest part of a TCG arm64 guest).
        Arch("aarch64", "arm64", "qemu-system-aarch64", "qemu-system-arm", "virt",
             "cortex-a72", "ttyAMA0", "BOOTAA64.EFI", 0xAA64, 2.0),
        Arch("riscv64", "riscv64", "qemu-system-riscv64", "qemu-system-misc", "virt",
             "rv64", "ttyS0", "BOOTRISCV64.EFI", 0x5064, 2.0),
    )
}  # fmt: skip
_ALIASES = {"amd64": "x86_64", "x86-64": "x86_64", "arm64": "aarch64"}


def canonical(name: str) -> str | None:
    """``name`` as a ``uname -m`` name we know, or None."""
    text = name.strip().lower()
    text = _ALIASES.get(text, text)
    return text if text in ARCHES else None


def parse_arch(value: Any, where: str) -> str:
    """``auto`` or an architecture's ``uname -m`` name (Debian's names accepted), or a
    one-line error naming the value and ``where`` it came from."""
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    found = canonical(value) if isinstance(value, str) else None
    if found is None:
        known = ", ".join([AUTO, *ARCHES])
        raise KvmConfigError(f"{where}: architecture {value!r} is not one of {known}")
    return found


def get(name: str) -> Arch:
    """The :class:`Arch` called ``name`` (a ``uname -m`` name)."""
    found = canonical(name)
    if found is None:
        raise KvmConfigError(f"architecture {name!r} is not one of {', '.join(ARCHES)}")
    return ARCHES[found]


def host_arch() -> str:
    """This host's architecture (``uname -m``), as an :data:`ARCHES` name if known."""
    machine = platform.machine()
    return canonical(machine) or machine


def check_qemu(arch: Arch, what: str) -> str:
    """The path of ``arch``'s QEMU, or KvmUnavailable (guests of it skip) naming
    ``what`` needs it, the binary and Debian's package."""
    path = shutil.which(arch.qemu)
    if path is None:
        raise KvmUnavailable(
            f"{what} is {arch.name}: {arch.qemu} is not installed "
            f"(Debian package {arch.package}: apt-get install {arch.package})"
        )
    return path
