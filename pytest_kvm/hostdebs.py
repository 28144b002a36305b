"""Debian packages that a guest's image lacks, for guests that reach no mirror: fetched
on the host with the host's own apt (its configured sources) into a small local
repository, then installed in the guest from a copy of that repository.

    repo = fetch_debs(["nginx"], cache / "debs" / "nginx")   # once, then cached
    install_debs(guest, repo, ["nginx"])                     # e.g. in a kvm_snapshot setup

The repository holds the packages and everything they depend on (no recommends), so
apt in the guest picks what it lacks; the host must run the same Debian release as
the guest (the packages are the host's), and needs ``dpkg-dev`` for the index.
Nothing in the guest's apt configuration is changed: the copy is the only source of
the two ``apt-get`` calls (``-o Dir::Etc::SourceList=``) and is removed afterwards."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from filelock import FileLock

from .errors import KvmError

# Where the repository's copy goes in the guest (removed after the install).
GUEST_REPO = "/var/tmp/pytest-kvm-debs"
_NOT_DEPENDS = ("--no-recommends", "--no-suggests", "--no-conflicts", "--no-breaks",
                "--no-replaces", "--no-enhances")  # fmt: skip


class DebsFailed(KvmError):
    """The host's apt could not fetch or index the packages."""


class TakesDebs(Protocol):
    """What ``install_debs`` needs of a guest (a ``Guest`` is one)."""

    def copy_from_host(self, source: str | Path, target: str, timeout: float = 300) -> None: ...

    def succeed(self, cmd: str, timeout: float = 60) -> str: ...


def _host(argv: list[str], cwd: Path) -> bytes:
    try:
        done = subprocess.run(argv, cwd=cwd, capture_output=True, check=False)
    except FileNotFoundError:
        raise DebsFailed(
            f"{argv[0]} is not installed on the host (dpkg-scanpackages is in dpkg-dev)"
        ) from None
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip()[-2000:]
        raise DebsFailed(f"{shlex.join(argv)} failed (exit {done.returncode}): {err}")
    return done.stdout


def fetch_debs(packages: Sequence[str], dest: Path) -> Path:
    """``packages`` and what they depend on, downloaded with the host's apt into
    ``dest`` and indexed (``Packages``); returns ``dest``. Done once: a ``dest`` that
    has its index is used as it is. Under a file lock, into a temporary directory
    renamed into place, so an interrupted fetch leaves nothing half-made."""
    if not packages or any(not p or p.startswith("-") for p in packages):
        raise DebsFailed(f"{list(packages)!r} is not a list of package names")
    if (dest / "Packages").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(dest) + ".lock"):
        if (dest / "Packages").is_file():
            return dest
        work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        try:
            deps = _host(["apt-cache", "depends", "--recurse", *_NOT_DEPENDS, *packages], work)
            names = sorted(
                {line.strip() for line in deps.decode().splitlines() if line[:1] not in " <"}
            )  # indented lines are the relations; <name> is a virtual package
            _host(["apt-get", "download", *names], work)
            index = _host(["dpkg-scanpackages", "--multiversion", "."], work)
            (work / "Packages").write_bytes(index)
            work.chmod(0o755)
            if dest.exists():  # a leftover without its index
                shutil.rmtree(dest)
            os.rename(work, dest)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return dest


def install_debs(
    guest: TakesDebs, repo: Path, packages: Sequence[str], timeout: float = 900
) -> None:
    """Install ``packages`` in ``guest`` from ``repo`` (``fetch_debs``): the repository
    is copied in, made the only apt source of ``apt-get update`` and ``install``, and
    removed again with the lists it made."""
    if not (repo / "Packages").is_file():
        raise DebsFailed(f"{str(repo)!r} is not a repository made by fetch_debs (no Packages)")
    where = shlex.quote(GUEST_REPO)
    guest.succeed(f"rm -rf {where}")
    guest.copy_from_host(repo, GUEST_REPO)
    line = f"deb [trusted=yes] file:{GUEST_REPO} ./"
    guest.succeed(
        f"mkdir -p {where}/parts && printf '%s\\n' {shlex.quote(line)} >{where}/local.list"
    )
    apt = (
        "DEBIAN_FRONTEND=noninteractive apt-get -q -o APT::Sandbox::User=root "
        f"-o Dir::Etc::SourceList={where}/local.list -o Dir::Etc::SourceParts={where}/parts"
    )
    names = " ".join(shlex.quote(p) for p in packages)
    try:
        guest.succeed(f"{apt} update && {apt} install -y --no-install-recommends {names}", timeout)
    finally:
        guest.succeed(f"rm -rf {where} /var/lib/apt/lists/*_pytest-kvm-debs_* && apt-get clean")
