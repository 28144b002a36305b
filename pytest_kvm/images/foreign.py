"""The configure stage of a foreign-architecture image build, under qemu-user.

A root file system for arm64 or riscv64 is unpacked on the host without running
any of its code (``debootstrap --foreign``), then configured by ``debootstrap
--second-stage`` in a chroot of it: every maintainer script, ``dpkg`` itself and
the kernel's initramfs hooks are the image's own programs, which the kernel hands
to ``qemu-<arch>-static`` (Debian's qemu-user-static) through binfmt_misc.

The entry must carry binfmt_misc's ``F`` flag: the kernel opens the interpreter
when the entry is registered, so it need not exist inside the chroot. Debian's
``/usr/lib/binfmt.d/qemu-<arch>.conf`` registers it that way; where nothing has
(no systemd-binfmt at boot, binfmt_misc not mounted), :func:`ensure_binfmt`
mounts binfmt_misc and registers that file's line, as systemd-binfmt would.
"""

from __future__ import annotations

import os
import resource
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .. import arch as arches
from ..errors import ImageError, KvmUnavailable
from .commands import Progress

BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
#: Where Debian's qemu-user-static keeps its binfmt_misc registrations.
BINFMT_CONF_DIR = Path("/usr/lib/binfmt.d")
BINFMT_PACKAGE = "qemu-user-static"

#: Files the stage puts in place only for the build and removes afterwards.
POLICY_RC_D = "usr/sbin/policy-rc.d"
DPKG_UNSAFE_IO = "etc/dpkg/dpkg.cfg.d/pytest-kvm-build"
#: debootstrap's log of the second stage, inside the tree (gone once it succeeds).
DEBOOTSTRAP_LOG = "debootstrap/debootstrap.log"


@dataclass(frozen=True)
class ForeignArch:
    """A Debian architecture whose programs run here under qemu-user."""

    debian: str  # "arm64"
    qemu_user: str  # qemu-user's name for it, and its binfmt_misc entry's suffix


#: By Debian's name; qemu-user names an architecture as ``uname -m`` does (arch.py).
ARCHES: dict[str, ForeignArch] = {
    spec.debian: ForeignArch(debian=spec.debian, qemu_user=spec.name)
    for spec in arches.ARCHES.values()
}


def binfmt_problem(arch: ForeignArch, binfmt_dir: Path = BINFMT_DIR) -> str | None:
    """Why this host cannot run ``arch``'s programs in a chroot, or None if it can."""
    if not (binfmt_dir / "register").exists():
        return f"binfmt_misc is not mounted on {binfmt_dir}"
    entry = binfmt_dir / f"qemu-{arch.qemu_user}"
    try:
        lines = entry.read_text().splitlines()
    except FileNotFoundError:
        return f"binfmt_misc has no qemu-{arch.qemu_user} entry"
    if not lines or lines[0].strip() != "enabled":
        return f"binfmt_misc's {entry} is disabled"
    flags = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("flags:")), "")
    if "F" not in flags:
        return (
            f"binfmt_misc's {entry} lacks the F flag (its interpreter would have to be "
            "inside the image); register qemu-user-static's entry instead"
        )
    return None


def ensure_binfmt(
    arch: ForeignArch,
    progress: Progress,
    *,
    binfmt_dir: Path = BINFMT_DIR,
    conf_dir: Path = BINFMT_CONF_DIR,
) -> None:
    """Make the kernel run ``arch``'s programs through qemu-user-static: nothing if
    it already does; as root, mount binfmt_misc and register qemu-user-static's
    entry; otherwise KvmUnavailable saying what is missing and how to add it."""
    problem = binfmt_problem(arch, binfmt_dir)
    if problem is None:
        return
    what = f"cannot build {arch.debian} images: {problem}"
    conf = conf_dir / f"qemu-{arch.qemu_user}.conf"
    if not conf.is_file():
        raise KvmUnavailable(f"{what}, and there is no {conf} (apt-get install {BINFMT_PACKAGE})")
    if (binfmt_dir / f"qemu-{arch.qemu_user}").exists():
        # someone else's registration: not ours to replace
        raise KvmUnavailable(what)
    if os.geteuid() != 0:
        raise KvmUnavailable(f"{what}; as root: bash scripts/setup.sh (registers {conf})")
    if not (binfmt_dir / "register").exists():
        subprocess.run(
            ["mount", "-t", "binfmt_misc", "binfmt_misc", str(binfmt_dir)],
            check=True,
            capture_output=True,
        )
    line = next(
        (s for s in conf.read_text().splitlines() if s.startswith(":")),
        None,
    )
    if line is None:
        raise KvmUnavailable(f"{what}: {conf} holds no registration line")
    try:
        (binfmt_dir / "register").write_text(line + "\n")
        progress(f"stage: registered {conf} with binfmt_misc")
    except FileExistsError:
        pass  # another build registered it since: checked below like ours
    problem = binfmt_problem(arch, binfmt_dir)
    if problem is not None:
        raise KvmUnavailable(f"cannot build {arch.debian} images: {problem}")


def children_cpu_seconds() -> float:
    """User + system CPU-seconds of this process's waited-for children so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def second_stage_argv(chroot: str, root: Path) -> list[str]:
    """``debootstrap --second-stage`` inside ``root``."""
    return [chroot, str(root), "/debootstrap/debootstrap", "--second-stage"]


def failure_detail(root: Path, lines: int = 30) -> str:
    """The end of debootstrap's own log in the tree, where it says which package
    failed and why ("" when there is none)."""
    try:
        text = (root / DEBOOTSTRAP_LOG).read_text(errors="replace")
    except OSError:
        return ""
    tail = text.splitlines()[-lines:]
    if not tail:
        return ""
    return f"\n--- {DEBOOTSTRAP_LOG} (last {len(tail)} lines) ---\n" + "\n".join(tail)


def stage_error(exc: ImageError, root: Path) -> ImageError:
    """``exc`` with debootstrap's log tail appended."""
    return ImageError(f"{exc}{failure_detail(root)}")
