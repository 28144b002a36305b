"""``qemu-nbd`` exporting an encrypted qcow2 chain decrypted, on a private UNIX socket,
with the key read by QEMU from the secret file: libguestfs cannot pass a qcow2 key."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from ..errors import ImageError, KvmUnavailable
from ..images.overlay import check_qemu_path, key_secret_opts, secret_object
from ..lease import Lease, lease_dir, owner_fields
from ..spawn import spawn
from ..util import process_start
from .source import DiskSource


class _NbdExport:
    """``qemu-nbd`` serving a decrypted view of an encrypted chain on a private socket.

    It must not outlive us (it serves the disk in the clear): it gets the parent-death
    signal, like QEMU, and a lease, so that ``reap`` ends it if that ever fails."""

    def __init__(self, source: DiskSource, readonly: bool) -> None:
        self.source = source
        self.readonly = readonly
        self.dir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.lease: Lease | None = None

    @property
    def socket(self) -> Path:
        assert self.dir is not None
        return self.dir / "nbd.sock"

    def start(self, timeout: float = 120) -> None:
        if shutil.which("qemu-nbd") is None:
            raise KvmUnavailable("qemu-nbd is not installed (Debian package: qemu-utils)")
        assert self.source.secret is not None
        check_qemu_path(str(self.source.path))
        self.dir = Path(tempfile.mkdtemp(prefix="pytest-kvm-nbd-"))
        os.chmod(self.dir, 0o700)
        self.lease = Lease.create(lease_dir(), self.dir.name, {
            "kind": "nbd", "name": str(self.source.path), "dir": str(self.dir),
            "socket": str(self.socket), **owner_fields(),
        })  # fmt: skip
        opts = f"driver=qcow2,file.filename={self.source.path}," + key_secret_opts(
            self.source.encrypted
        )
        argv = ["qemu-nbd", "--object", secret_object(self.source.secret), "--image-opts",
                "--socket", str(self.socket), "--persistent", "--shared=1"]  # fmt: skip
        if self.readonly:
            argv.append("--read-only")
        argv.append(opts)
        self.proc = spawn(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.lease.update(qemu_pid=self.proc.pid, qemu_start=process_start(self.proc.pid))
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                self.close()
                raise ImageError(
                    f"qemu-nbd could not open {str(self.source.path)!r}: {err.strip()[-300:]}"
                )
            if time.monotonic() > deadline:
                self.close()
                raise ImageError(f"qemu-nbd did not serve {str(self.source.path)!r} in time")
            time.sleep(0.05)

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
        if self.lease is not None:
            self.lease.remove()
            self.lease = None
