"""QemuMachine: one QEMU process started directly, QMP through qemu.qmp, no daemon.

Lifecycle like QEMU's own ``QEMUMachine``: the constructor records, ``start()`` acts
(and on failure cleans up first, then raises with argv and console tail), ``close()``
is idempotent and removes sockets and threads.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from qemu.qmp import ExecuteError

from ...console import tail
from ...errors import GuestLaunchError
from ...qga import GuestAgent
from ...spawn import spawn
from ..base import Machine, MachineSpec, QmpError
from .argv import build_argv
from .qmp import Qmp


def _spawn(
    argv: list[str], log: IO[bytes], pass_fds: tuple[int, ...], die_with_parent: bool = True
) -> subprocess.Popen[bytes]:
    return spawn(
        argv,
        die_with_parent,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        close_fds=True,
        pass_fds=pass_fds,
        start_new_session=True,  # Ctrl-C reaches pytest, which tears down
    )


class QemuMachine(Machine):
    """One QEMU process. ``on_spawn(pid)`` is called as soon as it exists, before
    ``start`` waits for it (so its lease can name it: see guest.py)."""

    def __init__(
        self,
        spec: MachineSpec,
        binary: str | None = None,
        on_spawn: Callable[[int], None] | None = None,
    ) -> None:
        self.spec = spec
        self._binary = binary
        self._on_spawn = on_spawn
        self._argv = build_argv(spec, binary)
        self._proc: subprocess.Popen[bytes] | None = None
        self._qmp: Qmp | None = None
        self._closed = False
        self._shots = itertools.count(1)  # next() is atomic: the recorder's thread too

    @property
    def argv(self) -> list[str]:
        return list(self._argv)

    def agent(self) -> GuestAgent:
        return GuestAgent(self.spec.qga_socket)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def events(self) -> list[dict[str, Any]]:
        return list(self._qmp.events) if self._qmp else []

    def start(self, connect_timeout: float = 30.0) -> None:
        if self._proc is not None:
            raise RuntimeError("machine already started")
        spec = self.spec
        try:
            self._qmp = Qmp(spec.name)
            self._qmp.start_server(str(spec.qmp_socket))
            with spec.stderr_log.open("wb") as log:
                fds = (spec.tap_fd,) if spec.tap_fd is not None else ()
                self._proc = _spawn(self._argv, log, fds, spec.die_with_parent)
            if self._on_spawn is not None:
                self._on_spawn(self._proc.pid)
            self._qmp.accept(connect_timeout, self.is_running)
            if spec.incoming is not None:
                self._restore(spec.incoming, connect_timeout)
        except BaseException as exc:
            code = self._proc.poll() if self._proc else None
            self.close()
            if isinstance(exc, KeyboardInterrupt):
                raise
            output = tail(spec.stderr_log, 10)
            raise GuestLaunchError(
                f"guest {spec.name!r}: QEMU failed to start"
                + (f" (exit {code})" if code is not None else f" ({exc})")
                + (f": {output}" if output else ""),
                argv=self.argv,
                exit_code=code,
                console_tail=tail(spec.serial_log, 20),
            ) from (exc if not isinstance(exc, TimeoutError) else None)

    def _restore(self, state: Path, timeout: float) -> None:
        """Load a state saved by ``save_state``; returns once the guest runs."""
        assert self._qmp is not None
        self.qmp(
            "migrate-set-capabilities",
            capabilities=[{"capability": "x-ignore-shared", "state": True}],
        )
        fd = os.open(state, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._qmp.run(self._qmp.getfd(fd, "state"), 10)
        finally:
            os.close(fd)  # QEMU has its own copy now
        self.qmp("migrate-incoming", uri="fd:state")
        deadline = time.monotonic() + timeout
        while True:
            status = self.qmp("query-status")["status"]
            if status == "running":
                return
            if status == "paused":  # loaded; saved from a paused guest
                self.qmp("cont")
                continue
            if status not in ("inmigrate", "prelaunch", "restore-vm"):
                raise RuntimeError(f"restoring the saved state ended in state {status!r}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the saved state was not loaded within {timeout:.0f} s")
            time.sleep(0.005)

    def save_state(self, path: Path, timeout: float = 120.0) -> None:
        """Pause the guest and write its device state (and any RAM not in a shared
        file) to ``path``; the guest stays paused. Raises if migration fails."""
        self.qmp("stop")
        self.qmp(
            "migrate-set-capabilities",
            capabilities=[{"capability": "x-ignore-shared", "state": True}],
        )
        with path.open("wb") as out:
            assert self._qmp is not None
            self._qmp.run(self._qmp.getfd(out.fileno(), "state"), 10)
            self.qmp("migrate", uri="fd:state")
            deadline = time.monotonic() + timeout
            while True:
                info = self.qmp("query-migrate")
                status = info.get("status")
                if status == "completed":
                    break
                if status in ("failed", "cancelled") or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"saving the guest state: migration {status}: "
                        f"{info.get('error-desc', 'no detail')}"
                    )
                time.sleep(0.01)
            out.flush()
            os.fsync(out.fileno())

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def exit_code(self) -> int | None:
        return self._proc.poll() if self._proc else None

    def qmp(self, command: str, **args: Any) -> Any:
        if self._qmp is None or not self.is_running():
            raise ConnectionError(f"guest {self.spec.name!r} is not running")
        try:
            return self._qmp.run(self._qmp.client.execute(command, args or None), 30)
        except ExecuteError as exc:
            raise QmpError(command, exc.error_class, exc.error.error.desc) from None

    def screenshot(self) -> bytes:
        """The display as QEMU writes it: PNG, or PPM from a QEMU that cannot write
        PNG (before 7.1 screendump has no ``format``; a build without libpng refuses
        it). Both refusals are a ``QmpError``."""
        raw = self.spec.workdir / f".screendump-{next(self._shots)}"
        try:
            try:
                self.qmp("screendump", filename=str(raw), format="png")
            except QmpError:
                self.qmp("screendump", filename=str(raw))
            return raw.read_bytes()
        finally:
            raw.unlink(missing_ok=True)

    def wait_for_exit(self, timeout: float) -> bool:
        if self._proc is None:
            return True
        try:
            self._proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def shutdown(self, timeout: float = 30.0) -> None:
        """ACPI power-off, then ``quit``, then SIGKILL."""
        if not self.is_running():
            return
        try:
            self.qmp("system_powerdown")
            if self.wait_for_exit(timeout):
                return
            self.qmp("quit")
            if self.wait_for_exit(5):
                return
        except (ConnectionError, TimeoutError, OSError, Exception):  # noqa: S110
            pass
        self.kill()

    def kill(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()

    def detach(self) -> None:
        """Let QEMU run on without us (a kept guest): close QMP, leave its sockets."""
        if self._closed:
            return
        self._closed = True
        if self._qmp is not None:
            self._qmp.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.kill()
        finally:
            if self._qmp is not None:
                self._qmp.close()
            for path in (self.spec.qmp_socket, self.spec.console_socket, self.spec.qga_socket):
                path.unlink(missing_ok=True)
