"""The qemu backend: QEMU started directly, QMP through qemu.qmp, no daemon.

Lifecycle like QEMU's own ``QEMUMachine``: the constructor records, ``start()`` acts
(and on failure cleans up first, then raises with argv and console tail), ``close()``
is idempotent and removes sockets and threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import IO, Any, TypeVar

from qemu.qmp import ExecuteError, QMPClient

from ..console import tail
from ..errors import GuestLaunchError
from ..images.overlay import key_secret_opts, secret_object
from ..network import netdev_args
from ..qga import GuestAgent
from ..spawn import spawn
from .base import Backend, Labels, Machine, MachineSpec, QmpError

QEMU_BINARY = "qemu-system-x86_64"
T = TypeVar("T")


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


def build_argv(spec: MachineSpec, binary: str = QEMU_BINARY) -> list[str]:
    """The QEMU command line for ``spec`` (pure: unit-tested without QEMU)."""
    accel = "kvm" if spec.accel == "kvm" else "tcg,thread=multi"
    argv = [
        binary,
        "-name", f"guest={spec.name},debug-threads=on",
        "-machine", "q35",
        "-accel", accel,
        "-cpu", "host" if spec.accel == "kvm" else "max",
        "-m", str(spec.memory),
        "-smp", str(spec.cpus),
        "-nodefaults", "-no-user-config",
        "-display", "none",
        "-chardev", f"socket,id=qmp,path={spec.qmp_socket}",
        "-mon", "chardev=qmp,mode=control",
        "-chardev",
        f"socket,id=ser0,path={spec.console_socket},server=on,wait=off,"
        f"logfile={spec.serial_log},logappend=on",
        "-serial", "chardev:ser0",
        "-device", "virtio-rng-pci",
        # A new generation ID on every start, restored clones included: the guest
        # kernel reseeds its random pool when it changes.
        "-device", "vmgenid,guid=auto",
        "-device", "virtio-serial-pci,id=vser0",
        "-chardev", f"socket,id=qga0,path={spec.qga_socket},server=on,wait=off",
        "-device", "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0",
    ]  # fmt: skip
    secrets = {drive.secret for drive in spec.drives if drive.secret is not None}
    if len(secrets) > 1:
        raise GuestLaunchError("drives encrypted with different secrets are not supported")
    for secret in secrets:
        argv += ["-object", secret_object(secret)]
    for index, drive in enumerate(spec.drives):
        _check_path_for_qemu(str(drive.path))
        opts = f"file={drive.path},format={drive.format},if=none,id=drive{index}"
        if drive.secret is not None and any(drive.encrypted):
            opts += "," + key_secret_opts(drive.encrypted)
        if drive.media == "cdrom":
            argv += ["-drive", opts + ",media=cdrom,readonly=on"]
            argv += ["-device", f"ide-cd,drive=drive{index},bus=ide.{index}"]
            continue
        if drive.readonly:
            opts += ",readonly=on"
        else:
            opts += ",cache=unsafe,discard=unmap"
        argv += ["-drive", opts]
        bootindex = ",bootindex=1" if index == 0 and spec.boot == "disk" else ""
        argv += ["-device", f"virtio-blk-pci,drive=drive{index}{bootindex}"]
    # Every guest has a graphics card, so a failed test's artifacts hold a screenshot
    # (QEMU's screendump needs one). No cost to clones, measured: it adds ~0.2 MB to a
    # template's saved state; display=True only says what tests may use.
    argv += ["-device", "VGA"]
    if spec.vnc:
        # The first free display from :0 up; nobody gets in before set_password.
        argv += ["-vnc", "127.0.0.1:0,to=99,password=on"]
    if spec.boot == "cdrom":
        argv += ["-boot", "order=d"]
    if spec.kernel is not None:
        argv += ["-kernel", str(spec.kernel), "-append", spec.append]
        if spec.initrd is not None:
            argv += ["-initrd", str(spec.initrd)]
    argv += netdev_args(spec.network, netdev_id="net0", ssh_port=spec.ssh_port, tap_fd=spec.tap_fd)
    argv += ["-device", f"virtio-net-pci,netdev=net0,mac={spec.mac}"]
    for nic in spec.nics:
        argv += ["-netdev", nic.netdev]
        argv += ["-device", f"virtio-net-pci,netdev={nic.netdev_id},mac={nic.mac}"]
    if spec.ram_file is not None:
        _check_path_for_qemu(str(spec.ram_file))
        share = "on" if spec.ram_shared else "off"
        argv += [
            "-object",
            f"memory-backend-file,id=ram0,size={spec.memory}M,mem-path={spec.ram_file},"
            f"share={share}",
            "-machine", "memory-backend=ram0",
        ]  # fmt: skip
    if spec.incoming is not None:
        # The state comes through QMP once the x-ignore-shared capability is set
        # (QEMU 7.2 has no command-line property for it); no -S, so the guest
        # resumes by itself once the state is loaded.
        argv += ["-incoming", "defer"]
    argv += list(spec.extra_args)
    return argv


def _check_path_for_qemu(path: str) -> None:
    # QEMU's option syntax splits on ',' ('' escapes it); refuse rather than misparse.
    if "," in path:
        raise GuestLaunchError(f"path {path!r} contains a comma, which QEMU options cannot carry")


class _Qmp:
    """A qemu.qmp client on its own event loop thread, so events arrive while tests run."""

    def __init__(self, name: str) -> None:
        self.client = QMPClient(name)
        self.events: list[dict[str, Any]] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"qmp-{name}", daemon=True
        )
        self._thread.start()
        self._collector: asyncio.Task[None] | None = None

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except FutureTimeout:
            future.cancel()
            raise TimeoutError(f"QMP did not answer within {timeout} s") from None

    def start_server(self, path: str) -> None:
        self.run(self.client.start_server(path), 10)

    def accept(self, timeout: float, alive: Any) -> None:
        future = asyncio.run_coroutine_threadsafe(self.client.accept(), self._loop)
        deadline = time.monotonic() + timeout
        while True:
            try:
                future.result(0.05)
                break
            except FutureTimeout:
                if not alive() or time.monotonic() > deadline:
                    future.cancel()
                    raise TimeoutError("QEMU did not connect to QMP") from None
        self._collector = self.run(self._start_collector(), 5)

    async def getfd(self, fd: int, name: str) -> None:
        """Hand QEMU a descriptor (SCM_RIGHTS), named for later commands."""
        self.client.send_fd_scm(fd)
        await self.client.execute("getfd", {"fdname": name})

    async def _start_collector(self) -> asyncio.Task[None]:
        return asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        async for event in self.client.events:
            self.events.append(dict(event))

    async def _shutdown(self) -> None:
        # Closing: the socket may already be gone.
        with contextlib.suppress(Exception):
            await self.client.disconnect()
        if self._collector is not None:
            self._collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._collector

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            self.run(self._shutdown(), 10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()


class QemuMachine(Machine):
    """One QEMU process. ``on_spawn(pid)`` is called as soon as it exists, before
    ``start`` waits for it (so its lease can name it: see guest.py)."""

    def __init__(
        self,
        spec: MachineSpec,
        binary: str = QEMU_BINARY,
        on_spawn: Callable[[int], None] | None = None,
    ) -> None:
        self.spec = spec
        self._binary = binary
        self._on_spawn = on_spawn
        self._argv = build_argv(spec, binary)
        self._proc: subprocess.Popen[bytes] | None = None
        self._qmp: _Qmp | None = None
        self._closed = False
        self._shots = 0

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
            self._qmp = _Qmp(spec.name)
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
        self._shots += 1
        raw = self.spec.workdir / f".screendump-{self._shots}"
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


class QemuBackend(Backend):
    """QEMU started directly on this host: nothing to check or hold per run."""

    name = "qemu"

    def machine(
        self,
        spec: MachineSpec,
        *,
        on_spawn: Callable[[int], None] | None = None,
        labels: Labels = (),
    ) -> QemuMachine:
        return QemuMachine(spec, on_spawn=on_spawn)


BACKEND = QemuBackend
