"""Machine specs for backend tests: a full one (two drives) and a bare small one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pytest_kvm.backends.base import Drive, MachineSpec
from pytest_kvm.config import NetworkSpec

# The volumes ``spec``'s two drives become in a libvirt pool.
LIBVIRT_DISKS = [("pytest-kvm", "pytest-kvm-g-0.qcow2", "qcow2", "disk"),
                 ("pytest-kvm", "pytest-kvm-g-1.raw", "raw", "cdrom")]  # fmt: skip


def spec(tmp_path: Path, **kw: Any) -> MachineSpec:
    """A TCG guest with a disk and a seed ISO in ``tmp_path``; ``kw`` overrides fields."""
    base: dict[str, Any] = dict(
        name="kvm-ab12-main-01",
        workdir=tmp_path,
        drives=(Drive(tmp_path / "disk.qcow2"), Drive(tmp_path / "seed.iso", "raw", readonly=True)),
        memory=1024,
        cpus=2,
        accel="tcg",
        network=NetworkSpec("user"),
        mac="02:6b:76:00:00:01",
        ssh_port=40022,
    )
    base.update(kw)
    return MachineSpec(**base)


def libvirt_spec(tmp_path: Path, **kw: Any) -> MachineSpec:
    """``spec`` with the memory the libvirt tests expect in their XML."""
    return spec(tmp_path, **{"memory": 768, **kw})


def small_spec(tmp_path: Path) -> MachineSpec:
    """A driveless 256 MiB guest whose workdir ``tmp_path/g`` is made here."""
    work = tmp_path / "g"
    work.mkdir()
    return MachineSpec("kvm-t-main-01", work, (), 256, 1, "tcg", NetworkSpec("user"),
                       "02:6b:76:00:00:01", 40022)  # fmt: skip


def opt(argv: list[str], flag: str) -> list[str]:
    """The values of every ``flag`` in ``argv`` (``-smp 2`` -> ["2"])."""
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]
