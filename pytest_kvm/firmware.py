"""The guest's firmware (``--kvm-firmware``): SeaBIOS, or OVMF with a variables file
of the guest's own, with or without Secure Boot. Values, OVMF's files and QEMU's
options; which image can boot what is in :mod:`pytest_kvm.images.efi`.

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

FIRMWARES = ("auto", "bios", "uefi", "uefi-secure")
#: What ``auto`` means: what every image boots today (hybrid images boot BIOS first).
DEFAULT = "bios"
OVMF_DIR = Path(os.environ.get("PYTEST_KVM_OVMF_DIR", "/usr/share/OVMF"))
#: The guest's own copy of the variables, next to its disk.
VARS_NAME = "efivars.fd"


def parse_firmware(value: Any, where: str) -> str:
    """One of :data:`FIRMWARES`, or a one-line error naming the value and ``where``."""
    text = value.strip().lower() if isinstance(value, str) else value
    if text not in FIRMWARES:
        raise KvmConfigError(f"{where}: {value!r} is not one of {', '.join(FIRMWARES)}")
    return str(text)


def resolve(name: str) -> str:
    """``auto`` as what it means today: BIOS."""
    return DEFAULT if name == "auto" else name


@dataclass(frozen=True)
class Ovmf:
    """OVMF's code (read-only, shared) and the variables template each guest copies."""

    name: str  # "uefi" | "uefi-secure"
    code: Path
    vars: Path
    secure: bool

    @classmethod
    def find(cls, name: str, directory: Path | None = None) -> Ovmf:
        """The files for ``name``; a one-line error naming Debian's ``ovmf`` if missing."""
        directory = directory or OVMF_DIR
        secure = name == "uefi-secure"
        if secure:
            code, variables = "OVMF_CODE_4M.secboot.fd", "OVMF_VARS_4M.ms.fd"
        else:
            code, variables = "OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd"
        found = cls(name, directory / code, directory / variables, secure)
        missing = [str(p) for p in (found.code, found.vars) if not p.is_file()]
        if missing:
            raise KvmConfigError(
                f"firmware {name!r} needs OVMF: {', '.join(missing)} missing (apt-get install ovmf)"
            )
        return found

    def copy_vars(self, dest: Path, source: Path | None = None) -> Path:
        """A private copy of the variables (of ``source``, a template's, if given)."""
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.copyfile(source or self.vars, tmp)
        tmp.chmod(0o600)
        os.replace(tmp, dest)
        return dest

    def qemu_args(self, variables: Path) -> list[str]:
        """QEMU options for this firmware with ``variables`` as the guest's own flash."""
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
