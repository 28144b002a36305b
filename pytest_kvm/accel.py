"""Accelerator probe: use KVM only where it can run a standard guest, else TCG."""

from __future__ import annotations

import functools
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import KvmConfigError

# A 512-byte boot sector that goes from real mode through protected mode to long
# mode (PAE paging, EFER.LME) and writes 0x31 to isa-debug-exit: QEMU exits 99.
# Assembled from docs/accel-probe.S (as --32; objcopy -O binary): what a kernel does first.
_PROBE_SECTOR = bytes.fromhex(
    "fa31c08ed88ec08ed0bc007cbf0010b9001831c0f3ab66c70600100320000066c706002003300000"
    "66c706003083000000660f0116987c0f20e06683c8200f22e066b8001000000f22d866b9800000c0"
    "0f32660d000100000f300f20c0660d010000800f22c066ea6e7c0000080066b810008ed8b031e6f4"
    "f4ebfd8d74260090000000000000000000000000009a200000000000009200001700807c0000"
)
_PROBE_EXIT = (0x31 << 1) | 1


@dataclass(frozen=True)
class AccelChoice:
    """The accelerator guests will use and why."""

    name: str  # "kvm" | "tcg"
    reason: str
    warning: str = ""

    @property
    def timeout_scale(self) -> float:
        """Boot and command waits are multiplied by this under software emulation."""
        return 1.0 if self.name == "kvm" else 3.0


def kvm_problem(sysfs: Path = Path("/sys"), dev: Path = Path("/dev/kvm")) -> str:
    """Why KVM cannot run a standard guest here, or "" if the probe passes."""
    if not dev.exists():
        return f"{dev} does not exist (no KVM module loaded, or nested virtualisation is off)"
    if not os.access(dev, os.R_OK | os.W_OK):
        return f"{dev} is not readable and writable by this user (add it to group 'kvm')"
    if (sysfs / "module" / "kvm_pvm").exists():
        return (
            f"{dev} is provided by kvm_pvm (a PVM hypervisor), which runs only PVM-enabled "
            "guest kernels: a standard distribution kernel triple-faults under it"
        )
    return _boot_probe()


def _boot_probe(timeout: float = 5.0) -> str:
    with tempfile.TemporaryDirectory(prefix="pytest-kvm-probe-") as tmp:
        sector = Path(tmp) / "probe.img"
        sector.write_bytes(_PROBE_SECTOR + bytes(510 - len(_PROBE_SECTOR)) + b"\x55\xaa")
        argv = [
            "qemu-system-x86_64", "-accel", "kvm", "-machine", "pc", "-nodefaults",
            "-display", "none", "-no-reboot", "-m", "16",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-drive", f"file={sector},format=raw,if=ide",
        ]  # fmt: skip
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except FileNotFoundError:
            return "qemu-system-x86_64 is not installed"
        except subprocess.TimeoutExpired:
            return f"a long-mode test guest did not finish under KVM within {timeout:.0f} s"
    if proc.returncode != _PROBE_EXIT:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return f"a long-mode test guest failed under KVM (exit {proc.returncode}: {tail})"
    return ""


@functools.cache
def _cached_problem() -> str:
    return kvm_problem()


def choose(requested: str) -> AccelChoice:
    """Resolve ``--kvm-accel`` to the accelerator to use."""
    if requested == "tcg":
        return AccelChoice("tcg", "requested with --kvm-accel tcg")
    problem = _cached_problem()
    if requested == "kvm":
        if problem:
            raise KvmConfigError(f"--kvm-accel kvm: KVM cannot run guests here: {problem}")
        return AccelChoice("kvm", "requested with --kvm-accel kvm")
    if problem:
        return AccelChoice(
            "tcg",
            problem,
            warning=f"pytest-kvm: KVM not usable ({problem}); guests run under TCG (slow)",
        )
    return AccelChoice("kvm", "KVM probe passed")
