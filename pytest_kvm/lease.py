"""Leases: what each run and guest holds, written before it starts, in one directory
private to the user, so that a reaper (``reaper.py``) can tell live owners from dead
ones and clean up after the dead. The owner is PID plus process start time, host name,
boot id and PID namespace (see ``reaper.py`` for how they are judged)."""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .private import private_dir, read_regular, write_private
from .util import boot_id, pid_namespace, process_alive, process_start

LEASE_DIR_ENV = "PYTEST_KVM_LEASE_DIR"


def lease_dir() -> Path:
    """The user's lease directory (0700, owned by the user), made on first use."""
    configured = os.environ.get(LEASE_DIR_ENV)
    path = (
        Path(configured)
        if configured
        else Path(tempfile.gettempdir()) / f"pytest-kvm-leases-{os.getuid()}"
    )
    return private_dir(
        path, "lease directory", parents=bool(configured), fix=f"remove it or set {LEASE_DIR_ENV}"
    )


def here() -> dict[str, str]:
    """Where this process's PIDs mean something: host, boot and PID namespace."""
    return {"host": socket.gethostname(), "boot_id": boot_id(), "pidns": pid_namespace()}


def owner_fields() -> dict[str, Any]:
    pid = os.getpid()
    return {
        "pid": pid,
        "pid_start": process_start(pid),
        **here(),
        "created": time.time(),
    }


@dataclass
class Lease:
    """One lease file; ``update`` rewrites it atomically, ``remove`` deletes it."""

    path: Path
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def create(cls, directory: Path, stem: str, data: dict[str, Any]) -> Lease:
        lease = cls(directory / f"{stem}.json", dict(data))
        lease._write()
        return lease

    @classmethod
    def load(cls, path: Path) -> Lease | None:
        try:
            data = json.loads(read_regular(path))
        except (OSError, ValueError):
            return None
        return cls(path, data) if isinstance(data, dict) else None

    def _write(self) -> None:
        write_private(self.path, json.dumps(self.data, indent=1, sort_keys=True))

    def update(self, **fields: Any) -> None:
        self.data.update(fields)
        if self.path.exists():
            self._write()

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    @property
    def foreign(self) -> str:
        """Why this lease's PIDs cannot be judged here ("" if they can): it was written
        on another host, in another boot or in another PID namespace (a container
        sharing /tmp or the lease directory). Fields a lease lacks are not compared."""
        for key, value in here().items():
            theirs = self.data.get(key)
            if theirs is not None and theirs != value:
                return f"written with {key} {theirs}, this is {value or '?'}"
        return ""

    @property
    def owner_alive(self) -> bool:
        """Whether the run that wrote it may still be alive: a foreign lease always may."""
        if self.foreign:
            return True
        return process_alive(self.data.get("pid"), self.data.get("pid_start"))

    @property
    def kept(self) -> bool:
        return bool(self.data.get("kept"))

    @property
    def kind(self) -> str:
        return str(self.data.get("kind", ""))

    def describe(self) -> str:
        data = self.data
        what = data.get("name") or data.get("run_id", "?")
        return f"{self.kind} {what} (run {data.get('run_id', '?')}, pid {data.get('pid')})"


def leases(directory: Path | None = None) -> list[Lease]:
    directory = directory or lease_dir()
    found = []
    for path in sorted(directory.glob("*.json")):
        lease = Lease.load(path)
        if lease is not None:
            found.append(lease)
    return found
