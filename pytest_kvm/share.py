"""Shared host folders (``share=`` on ``@pytest.mark.kvm`` and ``kvm_guest_factory``):
the user's value checked into ``SharedDir`` entries, their virtio-9p mount tags and PCI
slots, and the guest-side script that mounts them.

Through virtio-9p: QEMU's ``-fsdev local`` serves the host folder (a backend, not part
of the saved state) and a ``virtio-9p-pci`` device carries it. A restored clone gets
that device on its own command line at a slot its template never used; the guest finds
it with a PCI rescan (``mount_script(rescan=True)``): q35's root bus takes no hot-plug,
and a template with hot-plug ports would be a new template for every guest.
"""

from __future__ import annotations

import posixpath
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import KvmConfigError

# The PCI slots (on bus 0) of the share devices: far above what a guest's own devices
# take (QEMU assigns those from slot 1 up), below q35's ICH9 functions at 0x1f.
FIRST_SLOT = 0x10
MAX_SHARES = 8


@dataclass(frozen=True)
class Share:
    """A share's guest side when it is not only a path: ``share={"/host/out":
    Share("/mnt/out", rw=True)}`` lets the guest write into the host folder."""

    dest: str
    rw: bool = False


@dataclass(frozen=True)
class SharedDir:
    """One checked share: an existing host directory, an absolute guest path."""

    source: Path
    dest: str
    rw: bool = False


def share_tag(index: int) -> str:
    """The 9p mount tag of a machine's ``index``-th share (at most 31 bytes)."""
    return f"kvmshare{index}"


def share_slot(index: int) -> int:
    """The PCI slot of a machine's ``index``-th share device."""
    return FIRST_SLOT + index


def parse_shares(value: Any, where: str) -> tuple[SharedDir, ...]:
    """``{"/host/dir": "/guest/dir" | Share(...)}`` checked; ``where`` names the source
    ("tests/x.py::t (@pytest.mark.kvm share=)")."""
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        raise KvmConfigError(
            f"{where}: {value!r} is not a dict of host folder -> guest path "
            '(e.g. {"/srv/data": "/mnt/data"})'
        )
    shares: list[SharedDir] = []
    for source, target in value.items():
        shares.append(_one(source, target, where))
    return merge_shares((), tuple(shares), where)


def _one(source: Any, target: Any, where: str) -> SharedDir:
    if not isinstance(source, str | Path) or not str(source):
        raise KvmConfigError(f"{where}: host folder {source!r} is not a path")
    path = Path(source).expanduser()
    if not path.exists():
        raise KvmConfigError(f"{where}: host folder {str(source)!r} does not exist")
    if not path.is_dir():
        raise KvmConfigError(f"{where}: host folder {str(source)!r} is not a directory")
    path = path.resolve()
    if "," in str(path) or "\n" in str(path):
        raise KvmConfigError(
            f"{where}: host folder {str(path)!r} has a comma or newline, which QEMU "
            "options cannot carry"
        )
    share = target if isinstance(target, Share) else Share(target)
    dest, rw = share.dest, share.rw
    if not isinstance(rw, bool):
        raise KvmConfigError(f"{where}: rw={rw!r} for {str(source)!r} is not True or False")
    if not isinstance(dest, str | Path):
        raise KvmConfigError(
            f"{where}: guest path {dest!r} for {str(source)!r} is not a path or Share(...)"
        )
    dest = str(dest)
    if not posixpath.isabs(dest) or "\0" in dest or "\n" in dest:
        raise KvmConfigError(
            f"{where}: guest path {dest!r} for {str(source)!r} is not an absolute path"
        )
    dest = posixpath.normpath(dest)
    if dest == "/" or dest.startswith("//"):
        raise KvmConfigError(f"{where}: guest path {dest!r} for {str(source)!r}: not the root")
    return SharedDir(path, dest, rw)


def merge_shares(
    base: tuple[SharedDir, ...], more: tuple[SharedDir, ...], where: str
) -> tuple[SharedDir, ...]:
    """``base`` (the marker's) with ``more`` (the factory's) on top: a guest path given
    in both is ``more``'s; at most ``MAX_SHARES``."""
    dests: set[str] = set()
    for share in more:
        if share.dest in dests:
            raise KvmConfigError(f"{where}: guest path {share.dest!r} is given twice")
        dests.add(share.dest)
    merged = tuple(share for share in base if share.dest not in dests) + more
    if len(merged) > MAX_SHARES:
        raise KvmConfigError(f"{where}: {len(merged)} shares; at most {MAX_SHARES}")
    return merged


def mount_script(shares: tuple[SharedDir, ...], rescan: bool) -> str:
    """The guest's script that mounts every share at its path (``rescan``: a restored
    clone, whose share devices appeared after its kernel scanned the PCI bus)."""
    lines = ["set -e"]
    if rescan:
        lines.append("echo 1 > /sys/bus/pci/rescan")
    lines.append("modprobe -a 9pnet_virtio 9p")
    for index, share in enumerate(shares):
        tag, dest = share_tag(index), shlex.quote(share.dest)
        opts = "trans=virtio,version=9p2000.L,msize=262144" + ("" if share.rw else ",ro")
        # The channel exists once the device's driver bound (udev may load it too).
        lines.append(
            "for i in $(seq 100); do "
            f"grep -qsaF {shlex.quote(tag)} /sys/bus/virtio/drivers/9pnet_virtio/*/mount_tag "
            "&& break; sleep 0.1; done"
        )
        lines.append(f"mkdir -p -- {dest}")
        lines.append(f"mount -t 9p -o {opts} {shlex.quote(tag)} {dest}")
    return "\n".join(lines)
