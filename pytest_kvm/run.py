"""Per-run state shared by every guest of one pytest process: id, private dir, SSH key."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .accel import AccelChoice
from .lease import Lease, lease_dir, owner_fields
from .network import Identity
from .ssh import KeyPair


class RunContext:
    """One per pytest process (controller or xdist worker); ``close`` removes it all."""

    def __init__(
        self,
        accel: AccelChoice,
        identity: Identity | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.accel = accel
        # Lines for the terminal (what a guest waits for, where its VNC is).
        self.progress: Callable[[str], None] = progress or (lambda message: None)
        self.identity = identity or Identity()
        base = os.environ.get("PYTEST_KVM_RUNTIME_DIR") or tempfile.gettempdir()
        # The short id keeps socket paths short; mkdtemp makes the dirs unique.
        prefix = f"pytest-kvm-{self.identity.short_id}-"
        self.dir = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
        os.chmod(self.dir, 0o700)
        # UNIX socket paths must fit in 108 bytes: keep them somewhere short.
        if len(str(self.dir)) <= 60:
            self.sock_dir = self.dir
        else:
            self.sock_dir = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        # Recorded right after its dirs are made, so that a run killed from here on
        # leaves nothing the next run (or `pytest-kvm reap`) cannot find.
        self._lease_dir = lease_dir()
        self.lease = Lease.create(
            self._lease_dir,
            f"run-{self.identity.run_id}-{self.identity.worker}-{os.getpid()}",
            {
                "kind": "run",
                "run_id": self.identity.run_id,
                "worker": self.identity.worker,
                "dir": str(self.dir),
                "sock_dir": str(self.sock_dir),
                **owner_fields(),
            },
        )
        self.client_key = KeyPair.generate(f"pytest-kvm-{self.identity.run_id}").save(
            self.dir / "id_ed25519"
        )
        self._kept: list[str] = []
        self._closed = False

    def guest_lease(self, name: str, **fields: object) -> Lease:
        """A lease for guest ``name``, written now (before it starts)."""
        return Lease.create(
            self._lease_dir,
            f"guest-{name}",
            {
                "kind": "guest",
                "run_id": self.identity.run_id,
                "worker": self.identity.worker,
                "name": name,
                **owner_fields(),
                **fields,
            },
        )

    def keep(self, name: str) -> None:
        """Guest ``name`` stays running after the run: keep the run's dirs (its key)."""
        self._kept.append(name)
        self.lease.update(kept=True)

    def guest_dir(self, name: str) -> Path:
        path = self.dir / name
        path.mkdir(mode=0o700)
        return path

    def socket_dir(self, name: str) -> Path:
        """Where a guest's sockets go: its own dir, or one under a short path."""
        if self.sock_dir == self.dir:
            return self.dir / name
        path = self.sock_dir / name
        path.mkdir(mode=0o700)
        return path

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._kept:
            return  # `pytest-kvm reap` removes them with the kept guests
        shutil.rmtree(self.dir, ignore_errors=True)
        shutil.rmtree(self.sock_dir, ignore_errors=True)
        self.lease.remove()
