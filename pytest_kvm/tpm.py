"""An emulated TPM 2.0 for one guest: Debian's ``swtpm`` on a private state directory
(0700) and a control socket (0600), started before QEMU and ended by its PID after it.

QEMU's ``tpm-emulator`` backend talks to it over the socket and carries the TPM's
state in its migration stream: a template's saved state holds its TPM, and a clone's
fresh swtpm (an empty state directory of its own) gets that state when the clone is
restored, so every clone has a copy of its own."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from .errors import GuestLaunchError, KvmConfigError
from .spawn import spawn
from .util import check_path_for_qemu, tail

SWTPM = "swtpm"
SWTPM_PACKAGE = "swtpm"  # Debian's package with /usr/bin/swtpm
# QEMU's ids for the TPM's chardev and backend (the device is tpm-crb on q35).
CHARDEV_ID = "tpm0chr"
TPMDEV_ID = "tpm0"
TPM_DEVICE = "tpm-crb"


def swtpm_path() -> str:
    """Where ``swtpm`` is on PATH, or "" when it is not installed."""
    return shutil.which(SWTPM) or ""


def check_swtpm(where: str) -> None:
    """A one-line KvmConfigError naming the Debian package when swtpm is missing."""
    if not swtpm_path():
        raise KvmConfigError(
            f"{where}: tpm=True needs swtpm, which is not on PATH here "
            f"(Debian package {SWTPM_PACKAGE}: apt-get install {SWTPM_PACKAGE})"
        )


def qemu_tpm_args(socket: Path) -> list[str]:
    """QEMU's options for a TPM 2.0 whose swtpm listens on ``socket``."""
    check_path_for_qemu(str(socket))
    return [
        "-chardev", f"socket,id={CHARDEV_ID},path={socket}",
        "-tpmdev", f"emulator,id={TPMDEV_ID},chardev={CHARDEV_ID}",
        "-device", f"{TPM_DEVICE},tpmdev={TPMDEV_ID}",
    ]  # fmt: skip


class Swtpm:
    """One swtpm process. The constructor records; ``start()`` makes the state dir,
    spawns swtpm and waits for its socket; ``close()`` kills it by PID and removes
    the state dir and socket (idempotent)."""

    def __init__(
        self, state_dir: Path, socket: Path, log: Path, die_with_parent: bool = True
    ) -> None:
        self.state_dir = state_dir
        self.socket = socket
        self.log = log
        self._die_with_parent = die_with_parent
        self._proc: subprocess.Popen[bytes] | None = None
        self._closed = False

    @property
    def argv(self) -> list[str]:
        return [
            swtpm_path() or SWTPM, "socket", "--tpm2",
            "--tpmstate", f"dir={self.state_dir},mode=0600",
            "--ctrl", f"type=unixio,path={self.socket},mode=0600",
            "--log", f"file={self.log},level=1",
        ]  # fmt: skip

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self, timeout: float = 30.0, on_spawn: Callable[[int], None] | None = None) -> None:
        """``on_spawn(pid)`` as soon as swtpm exists, before its socket does (its
        lease can name it from then on)."""
        if self._proc is not None:
            raise RuntimeError("swtpm already started")
        for path in (self.state_dir, self.socket, self.log):
            if "," in str(path):
                raise GuestLaunchError(f"swtpm: path {str(path)!r} contains a comma")
        try:
            self.state_dir.mkdir(mode=0o700)
            os.chmod(self.state_dir, 0o700)  # whatever the umask
            with self.log.open("ab") as log:
                self._proc = spawn(
                    self.argv,
                    self._die_with_parent,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    close_fds=True,
                    start_new_session=True,  # Ctrl-C reaches pytest, which tears down
                )
            if on_spawn is not None:
                on_spawn(self._proc.pid)
            self._wait_for_socket(timeout)
        except BaseException:
            self.close()
            raise

    def _wait_for_socket(self, timeout: float) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            code = self._proc.poll()
            if code is not None or time.monotonic() > deadline:
                said = tail(self.log, 5)
                raise GuestLaunchError(
                    f"swtpm did not open its socket {str(self.socket)!r}"
                    + (f" (exit {code})" if code is not None else f" within {timeout:.0f} s")
                    + (f": {said}" if said else "")
                )
            time.sleep(0.02)

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        proc = self._proc
        try:
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        finally:
            self.socket.unlink(missing_ok=True)
            shutil.rmtree(self.state_dir, ignore_errors=True)
