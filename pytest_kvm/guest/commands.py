"""The command vocabulary: run, succeed, fail, wait_*, put, get, reboot. Like the NixOS
test driver's BaseMachine it knows only an SSH session (through a ``Link``) and an
alive check; ``guest.host`` (testinfra) runs its commands through ``exec_bytes``."""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import paramiko

from ..errors import CommandFailed, GuestCrashed, GuestError, GuestTimeout, KvmConfigError
from ..ssh import CommandTimeout, GuestDied, SshSession, TransferTimeout, run_command
from ..util import tail_text


@dataclass(frozen=True)
class CommandResult:
    """What a command did, like testinfra's CommandResult."""

    command: str
    exit_status: int
    stdout: str
    stderr: str

    @property
    def succeeded(self) -> bool:
        return self.exit_status == 0

    @property
    def failed(self) -> bool:
        return self.exit_status != 0


class Link(Protocol):
    """Where commands get their SSH session."""

    def current(self) -> SshSession:
        """The open session (GuestError if there is none)."""

    def reconnect(self, timeout: float, lost: str | None = None) -> None:
        """Close the session and open a new one within ``timeout`` s."""

    def connect(self, deadline: float) -> None:
        """Open a session before ``deadline``."""


class Commands:
    """Commands on one guest; ``alive()`` is "" or why the guest is dead, ``crash_lines()``
    the console lines that say what happened, ``what`` how messages name the guest."""

    def __init__(
        self,
        link: Link,
        alive: Callable[[], str],
        crash_lines: Callable[[], str],
        *,
        what: str,
        name: str,
        timeout_scale: float,
        boot_timeout: float,
    ) -> None:
        self._link = link
        self._alive = alive
        self._crash_lines = crash_lines
        self._what = what
        self._name = name
        self._scale = timeout_scale
        self._boot_timeout = boot_timeout
        self._pid1: str | None = None  # "systemd", or PID 1's name: init_system

    def _session(self, lost: str, timeout: float) -> SshSession:
        session = self._link.current()
        if not session.is_active():
            # The connection was lost (sshd restarted or killed, the network down, a
            # reboot): wait for SSH again, at most as long as the command may take.
            self._link.reconnect(min(30.0, timeout) * self._scale, lost=lost)
            session = self._link.current()
        return session

    def run(self, cmd: str, timeout: float = 60) -> CommandResult:
        """Run ``cmd`` with the guest's shell; never raises for a non-zero exit."""
        __tracebackhide__ = True
        session = self._session(cmd, timeout)
        limit = timeout * self._scale
        try:
            raw = session.exec(cmd, limit, alive=self._alive)
        except GuestDied as exc:
            # Panicked (frozen: the TCP connection stays open) or QEMU exited.
            raise GuestCrashed(
                f"{exc.reason}; command {cmd!r} was running; console:\n{self._crash_lines()}",
                self._name,
            ) from None
        except CommandTimeout as exc:
            raise GuestTimeout(
                f"{self._what}: command {cmd!r} did not finish within {limit:.0f} s; "
                f"output so far: {tail_text(exc.stdout, 5)!r} {tail_text(exc.stderr, 5)!r}",
                self._name,
            ) from None
        except (OSError, EOFError, paramiko.SSHException) as exc:
            dead = self._alive()
            if dead:
                raise GuestCrashed(
                    f"{dead}; command {cmd!r} was running; console:\n{self._crash_lines()}",
                    self._name,
                ) from None
            raise GuestError(
                f"{self._what}: command {cmd!r}: SSH failed ({type(exc).__name__}: {exc}); "
                "the console is still reachable as guest.console",
                self._name,
            ) from None
        return CommandResult(cmd, raw.exit_status, raw.stdout, raw.stderr)

    def ssh_client(self) -> paramiko.SSHClient:
        """The paramiko client of the open session."""
        return self._link.current().client

    def exec_bytes(self, command: bytes, timeout: float) -> tuple[int, bytes, bytes]:
        """``command`` as bytes, its output as bytes (testinfra's ``host.file().content``):
        on the session, reopened if a reboot closed it; ``timeout`` is scaled."""
        session = self._link.current()
        transport = session.client.get_transport()
        if transport is None or not transport.is_active():
            self._link.reconnect(60 * self._scale)  # a reboot or sshd restart closed it
            transport = self._link.current().client.get_transport()
            assert transport is not None
        limit = timeout * self._scale
        shown = command.decode(errors="replace")
        try:
            return run_command(transport, command, limit)
        except CommandTimeout:
            raise GuestTimeout(
                f"{self._what}: testinfra command {shown!r} did not finish within {limit:.0f} s",
                self._name,
            ) from None
        except ConnectionResetError:
            raise ConnectionResetError(
                f"{self._what}: the SSH connection was lost while {shown!r} ran (no exit status)"
            ) from None

    def succeed(self, cmd: str, timeout: float = 60) -> str:
        """Run ``cmd``; return its stdout, or raise CommandFailed with both output tails."""
        __tracebackhide__ = True
        result = self.run(cmd, timeout)
        if result.exit_status != 0:
            detail = tail_text(result.stderr) or tail_text(result.stdout) or "no output"
            raise CommandFailed(
                f"{self._what}: command {cmd!r} failed (exit {result.exit_status}): {detail}",
                self._name,
                command=cmd,
                exit_status=result.exit_status,
                stdout=tail_text(result.stdout, 40),
                stderr=tail_text(result.stderr, 40),
            )
        return result.stdout

    def fail(self, cmd: str, timeout: float = 60) -> str:
        """Run ``cmd``; it must fail. Returns its stderr (or stdout if stderr is empty)."""
        __tracebackhide__ = True
        result = self.run(cmd, timeout)
        if result.exit_status == 0:
            raise CommandFailed(
                f"{self._what}: command {cmd!r} succeeded but was expected to fail: "
                f"{tail_text(result.stdout) or 'no output'}",
                self._name,
                command=cmd,
                exit_status=0,
                stdout=tail_text(result.stdout, 40),
                stderr=tail_text(result.stderr, 40),
            )
        return result.stderr or result.stdout

    def wait_until_succeeds(self, cmd: str, timeout: float = 120) -> str:
        """Retry ``cmd`` until it exits 0; the timeout error shows the last attempt."""
        __tracebackhide__ = True
        last = self._retry_command(cmd, True, max(timeout, 10), timeout,
                                   f"command {cmd!r} never succeeded")  # fmt: skip
        return last.stdout

    def wait_until_fails(self, cmd: str, timeout: float = 120) -> str:
        """Retry ``cmd`` until it exits non-zero; returns its output (stdout, else
        stderr); the timeout error shows the last attempt."""
        __tracebackhide__ = True
        last = self._retry_command(cmd, False, max(timeout, 10), timeout,
                                   f"command {cmd!r} never failed")  # fmt: skip
        return last.stdout or last.stderr

    def wait_for_file(self, path: str, timeout: float = 120) -> None:
        """Wait until ``path`` exists in the guest (any kind of file)."""
        __tracebackhide__ = True
        self._check_remote("wait_for_file", path)
        cmd = f"test -e {shlex.quote(path)}"
        self._retry_command(cmd, True, 30, timeout, f"{path!r} never appeared")

    @property
    def init_system(self) -> str:
        """``"systemd"`` if systemd runs the guest (``/run/systemd/system`` exists),
        else the name of PID 1 (``"init"`` for sysvinit). Asked once per guest."""
        if self._pid1 is None:
            found = self.succeed(
                "if test -d /run/systemd/system; then echo systemd; else cat /proc/1/comm; fi",
                timeout=30,
            ).strip()
            self._pid1 = found or "unknown"
        return self._pid1

    def wait_for_unit(self, unit: str, timeout: float = 120) -> None:
        """Wait until a systemd unit is active; a failed unit raises at once.

        On a guest without systemd (sysvinit) it raises GuestError at once: there
        are no units to ask about, and guessing from init scripts could be wrong."""
        __tracebackhide__ = True
        q = shlex.quote(unit)
        if self.init_system != "systemd":
            service = unit.removesuffix(".service")
            raise GuestError(
                f"{self._what}: wait_for_unit({unit!r}) needs systemd, but this guest "
                f"has no systemd (PID 1 is {self.init_system!r}, no /run/systemd/system); "
                f"wait for its init script instead, e.g. "
                f"guest.wait_until_succeeds({f'service {shlex.quote(service)} status'!r})",
                self._name,
            )
        last: CommandResult | None = None

        def attempt() -> bool:
            nonlocal last
            last = self.run(f"systemctl is-active {q}", timeout=30)
            state = last.stdout.strip()
            if state == "failed":
                status = self.run(f"systemctl status --no-pager --lines=10 {q}", timeout=30)
                raise CommandFailed(
                    f"{self._what}: unit {unit!r} failed:\n{tail_text(status.stdout, 15)}",
                    self._name,
                    command=last.command,
                    exit_status=last.exit_status,
                    stdout=status.stdout,
                )
            return state == "active"

        self._retry(attempt, timeout, lambda: f"unit {unit!r} never became active", lambda: last)

    def wait_for_port(self, port: int, timeout: float = 120) -> None:
        """Wait until something in the guest listens on TCP ``port``."""
        __tracebackhide__ = True
        if not 0 < int(port) < 65536:
            raise KvmConfigError(f"port {port!r} is not a TCP port number")
        cmd = f"ss -Htln {shlex.quote(f'sport = :{int(port)}')} | grep -q ."
        self._retry_command(cmd, True, 30, timeout, f"nothing listened on port {port}")

    def _retry_command(
        self, cmd: str, succeed: bool, run_timeout: float, timeout: float, what: str
    ) -> CommandResult:
        """Run ``cmd`` until it exits 0 (``succeed``) or non-zero (else); the last
        result. The timeout error says ``what`` and shows the last attempt."""
        __tracebackhide__ = True
        last: CommandResult | None = None

        def attempt() -> bool:
            nonlocal last
            last = self.run(cmd, timeout=run_timeout)
            return (last.exit_status == 0) == succeed

        self._retry(attempt, timeout, lambda: what, lambda: last)
        assert last is not None
        return last

    def _retry(
        self,
        attempt: Callable[[], bool],
        timeout: float,
        what: Callable[[], str],
        last: Callable[[], CommandResult | None],
    ) -> None:
        __tracebackhide__ = True
        limit = timeout * self._scale
        deadline = time.monotonic() + limit
        delay = 0.2
        while True:
            last_try = time.monotonic() >= deadline
            if attempt():
                return
            if last_try:
                seen = last()
                observed = (
                    f" (last exit {seen.exit_status}: "
                    f"{tail_text(seen.stdout + seen.stderr, 3) or 'no output'})"
                    if seen
                    else ""
                )
                raise GuestTimeout(f"{self._what}: {what()} within {limit:.0f} s{observed}",
                                   self._name)  # fmt: skip
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 1.5, 2.0)

    # -- files -------------------------------------------------------------------------

    def _check_remote(self, op: str, remote: object) -> None:
        """A guest path for SFTP: text, not empty, no NUL (which ends the SFTP session)."""
        if not isinstance(remote, str) or not remote or "\0" in remote:
            raise KvmConfigError(
                f"{self._what}: {op}: remote path {remote!r} is not a path "
                "(a non-empty string without NUL)"
            )

    def put(self, local: str | Path, remote: str, timeout: float = 300) -> None:
        """Copy the host file ``local`` to ``remote`` in the guest by SFTP, within
        ``timeout`` s (scaled under TCG); a guest that dies meanwhile is
        ``GuestCrashed`` within about a second."""
        local_path = Path(local)
        if not local_path.is_file():
            raise KvmConfigError(f"{self._what}: put: {str(local)!r} is not a file")
        self._check_remote("put", remote)
        what = f"put {str(local)!r} -> {remote!r}"
        self._transfer(what, lambda s, t: s.put(local_path, remote, t, alive=self._alive), timeout)

    def copy_from_host(self, local: str | Path, remote: str, timeout: float = 300) -> None:
        """``put`` for a file; a directory is copied with what it holds, ``remote``
        becoming the copy (files, and links to files as files; links to directories
        are not followed)."""
        local_path = Path(local)
        if not local_path.is_dir():
            self.put(local_path, remote, timeout)
            return
        self._check_remote("copy_from_host", remote)
        files, dirs = host_tree(local_path)
        made = " ".join(shlex.quote(join_remote(remote, d)) for d in dirs)
        self.succeed(f"mkdir -p -- {made}", timeout)
        for relative in files:
            self.put(local_path / relative, join_remote(remote, relative), timeout)

    def get(self, remote: str, local: str | Path, timeout: float = 300) -> Path:
        """Copy ``remote`` in the guest to the host file ``local`` by SFTP, like ``put``."""
        local_path = Path(local)
        self._check_remote("get", remote)
        what = f"get {remote!r} -> {str(local)!r}"
        try:
            self._transfer(
                what, lambda s, t: s.get(remote, local_path, t, alive=self._alive), timeout
            )
        except GuestError:
            local_path.unlink(missing_ok=True)
            raise
        return local_path

    def _transfer(
        self, what: str, transfer: Callable[[SshSession, float], None], timeout: float
    ) -> None:
        """Run an SFTP ``transfer`` on the guest's session; its failures as GuestErrors."""
        limit = timeout * self._scale
        session = self._session(what, timeout)  # lost (a reboot, sshd restarted): as in run
        try:
            transfer(session, limit)
        except GuestDied as exc:
            raise GuestCrashed(
                f"{exc.reason}; {what} was running; console:\n{self._crash_lines()}", self._name
            ) from None
        except TransferTimeout:
            raise GuestTimeout(
                f"{self._what}: {what} did not finish within {limit:.0f} s "
                "(the SSH connection was closed; the next command makes a new one)",
                self._name,
            ) from None
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise GuestError(f"{self._what}: {what}: {exc}", self._name) from None

    # -- power -------------------------------------------------------------------------

    def reboot(self, timeout: float | None, mark_console: Callable[[], None]) -> None:
        """Reboot the guest and wait until it answers SSH again (a new boot);
        ``mark_console`` once the old boot is known (console waits start there)."""
        __tracebackhide__ = True
        old_boot = self.succeed("cat /proc/sys/kernel/random/boot_id").strip()
        mark_console()
        # Detach so the command returns before sshd goes away.
        try:
            self.run(
                "systemd-run --no-block systemctl reboot || (sleep 1; reboot) >/dev/null 2>&1 &"
            )
        except GuestCrashed:
            raise
        except GuestError:  # the reboot took the connection before the command returned
            pass
        self._link.current().close()
        limit = (timeout or self._boot_timeout) * self._scale
        deadline = time.monotonic() + limit
        while True:
            self._link.connect(deadline)
            try:
                now = self.run("cat /proc/sys/kernel/random/boot_id").stdout.strip()
            except (GuestCrashed, GuestTimeout):
                raise
            except GuestError:  # reached the old boot's sshd as it went away
                now = ""
            if now and now != old_boot:
                return
            self._link.current().close()
            if time.monotonic() > deadline:
                raise GuestTimeout(f"{self._what}: did not reboot within {limit:.0f} s",
                                   self._name)  # fmt: skip
            time.sleep(0.5)


def host_tree(root: Path) -> tuple[list[str], list[str]]:
    """The files and directories under ``root`` as paths relative to it (``""`` is
    ``root`` itself), directories first-to-last in walk order, each sorted."""
    files: list[str] = []
    dirs: list[str] = [""]
    for here, subdirs, names in os.walk(root):
        subdirs.sort()
        base = Path(here).relative_to(root)
        dirs += [str(base / d) for d in subdirs]
        files += [str(base / n) for n in sorted(names) if (Path(here) / n).is_file()]
    return [f.removeprefix("./") for f in files], [d.removeprefix("./") for d in dirs]


def join_remote(remote: str, relative: str) -> str:
    """``remote`` joined with a relative host path, guest-side (POSIX)."""
    if not relative or relative == ".":
        return remote
    return remote.rstrip("/") + "/" + relative
