"""SSH to guests with paramiko: keys, pinned host keys, retry to a deadline, commands, SFTP."""

from __future__ import annotations

import base64
import contextlib
import getpass
import logging
import os
import pwd
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .errors import GuestTimeout


@dataclass(frozen=True)
class KeyPair:
    """An ed25519 key pair in OpenSSH formats; ``path`` holds the private key (0600)."""

    private_openssh: str
    public_openssh: str
    path: Path | None = None

    @classmethod
    def generate(cls, comment: str = "pytest-kvm") -> KeyPair:
        key = Ed25519PrivateKey.generate()
        private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ).decode()
        public = (
            key.public_key()
            .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            .decode()
        )
        return cls(private, f"{public} {comment}")

    @classmethod
    def load(cls, path: Path, comment: str = "pytest-kvm") -> KeyPair:
        """A private key saved by ``save``, its public half derived from it."""
        private = path.read_text()
        key = serialization.load_ssh_private_key(private.encode(), password=None)
        public = (
            key.public_key()
            .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            .decode()
        )
        return cls(private, f"{public} {comment}", path)

    def save(self, path: Path) -> KeyPair:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(self.private_openssh)
        return KeyPair(self.private_openssh, self.public_openssh, path)

    def pkey(self) -> paramiko.PKey:
        assert self.path is not None, "save() the key first"
        return paramiko.Ed25519Key.from_private_key_file(str(self.path))

    def public_key(self) -> paramiko.PKey:
        kind, blob = self.public_openssh.split()[:2]
        return paramiko.PKey.from_type_string(kind, _b64decode(blob))


def _b64decode(text: str) -> bytes:
    return base64.b64decode(text)


class CommandTimeout(Exception):
    """A command outlived its timeout; carries the output it had produced."""

    def __init__(self, stdout: str, stderr: str) -> None:
        super().__init__("command timed out")
        self.stdout = stdout
        self.stderr = stderr


class GuestDied(ConnectionAbortedError):
    """The guest died (panicked, or QEMU exited) while a command ran; ``reason`` says how."""

    def __init__(self, reason: str, stdout: str = "", stderr: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.stdout = stdout
        self.stderr = stderr


# paramiko's transports log here while they connect (their own logger, not
# paramiko's, whose level stays the user's); lower its level to see the attempts.
CONNECTING_LOG = "pytest_kvm.ssh.connecting"
PARAMIKO_LOG = "paramiko.transport"
logging.getLogger(CONNECTING_LOG).setLevel(logging.CRITICAL)

# How often ``exec`` asks ``alive()`` while a command runs, in seconds.
ALIVE_INTERVAL = 1.0


class TransferTimeout(TimeoutError):
    """An SFTP transfer did not finish in time; its connection was closed."""


# The default limit of one SFTP transfer, in seconds.
TRANSFER_TIMEOUT = 300.0


@dataclass(frozen=True)
class RawResult:
    exit_status: int
    stdout: str
    stderr: str


class JumpFailed(Exception):
    """The SSH connection to a hypervisor's host failed: no retry will help."""


class SshJump:
    """An SSH connection to a hypervisor host, through which guests' forwarded ports
    on that host's 127.0.0.1 are reached (``ssh -J``).

    Authenticates like ``ssh`` would, with the user's agent or ``~/.ssh`` keys, and
    trusts only host keys already in ``~/.ssh/known_hosts`` (or the system's). Like
    ``ssh`` (and libvirt's ssh transport), ``~`` is the home directory of the user
    in the password database, not ``$HOME``. One connection serves every guest; it
    is made again if it drops."""

    def __init__(self, user: str | None, host: str, port: int | None) -> None:
        self.user = user or getpass.getuser()
        self.host = host
        self.port = port or 22
        self._client: paramiko.SSHClient | None = None
        self._lock = threading.Lock()

    @property
    def spec(self) -> str:
        """``user@host:port``, as ``ssh -J`` takes it."""
        return f"{self.user}@{self.host}:{self.port}"

    def _transport(self, timeout: float) -> paramiko.Transport:
        with self._lock:
            client = self._client
            transport = client.get_transport() if client is not None else None
            if transport is not None and transport.is_active():
                return transport
            if client is not None:
                client.close()
            dot_ssh = Path(pwd.getpwuid(os.getuid()).pw_dir) / ".ssh"
            client = paramiko.SSHClient()
            client.load_system_host_keys()  # ~/.ssh/known_hosts by $HOME
            with contextlib.suppress(OSError):
                client.load_system_host_keys(str(dot_ssh / "known_hosts"))
            client.set_missing_host_key_policy(paramiko.RejectPolicy())
            keys = [str(dot_ssh / name) for name in ("id_ed25519", "id_ecdsa", "id_rsa")
                    if (dot_ssh / name).exists()]  # fmt: skip
            try:
                client.connect(
                    self.host, port=self.port, username=self.user, key_filename=keys or None,  # type: ignore[arg-type]
                    look_for_keys=False, allow_agent=True,
                    timeout=timeout, banner_timeout=timeout, auth_timeout=timeout,
                )  # fmt: skip
            except (OSError, EOFError, paramiko.SSHException) as exc:
                client.close()
                raise JumpFailed(
                    f"SSH to the hypervisor's host {self.spec} failed: {exc or type(exc).__name__}"
                    f" (keys tried: {', '.join(keys) or 'the agent only'}; its host key must be "
                    f"in {dot_ssh / 'known_hosts'})"
                ) from None
            self._client = client
            transport = client.get_transport()
            assert transport is not None
            transport.set_keepalive(15)
            return transport

    def channel(self, host: str, port: int, timeout: float) -> paramiko.Channel:
        """A TCP connection from the hypervisor host to ``host:port`` (its loopback)."""
        transport = self._transport(timeout)
        return transport.open_channel("direct-tcpip", (host, port), ("127.0.0.1", 0),
                                      timeout=timeout)  # fmt: skip

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None


class SshSession:
    """One paramiko connection to a guest, with the guest's host key pinned."""

    def __init__(
        self,
        host: str,
        port: int,
        user: str,
        client_key: KeyPair,
        host_key: KeyPair,
        jump: SshJump | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.user = user
        self.client_key = client_key
        self.host_key = host_key
        self.jump = jump
        self._client: paramiko.SSHClient | None = None

    @property
    def client(self) -> paramiko.SSHClient:
        if self._client is None:
            raise ConnectionError("not connected")
        return self._client

    def known_hosts_line(self) -> str:
        host = self.host if self.port == 22 else f"[{self.host}]:{self.port}"
        kind, blob = self.host_key.public_openssh.split()[:2]
        return f"{host} {kind} {blob}\n"

    def connect_once(self, timeout: float) -> None:
        """One attempt; raises what paramiko raised."""
        client = paramiko.SSHClient()
        # While the guest boots, refused and half-open connections are expected; paramiko
        # would print each as an ERROR with a traceback. The caller reports the last one.
        client.set_log_channel(CONNECTING_LOG)
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        name = self.host if self.port == 22 else f"[{self.host}]:{self.port}"
        client.get_host_keys().add(name, "ssh-ed25519", self.host_key.public_key())
        try:
            sock = self.jump.channel(self.host, self.port, timeout) if self.jump else None
            client.connect(
                self.host,
                port=self.port,
                username=self.user,
                pkey=self.client_key.pkey(),
                sock=sock,
                timeout=timeout,
                banner_timeout=timeout,
                auth_timeout=timeout,
                allow_agent=False,
                look_for_keys=False,
            )
        except BaseException:
            client.close()
            raise
        transport = client.get_transport()
        if transport is not None:
            transport.set_log_channel(PARAMIKO_LOG)  # connected: its errors count again
            transport.set_keepalive(15)
        self.close()
        self._client = client

    def connect(self, deadline: float, alive: Callable[[], str] | None = None) -> float:
        """Retry until connected or ``deadline`` (monotonic); returns seconds spent.

        ``alive()`` returns "" while the guest can still come up, else why not.
        """
        start = time.monotonic()
        last_error = "no attempt made"
        while True:
            if alive is not None:
                dead = alive()
                if dead:
                    raise ConnectionAbortedError(dead)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GuestTimeout(f"SSH to {self.host}:{self.port} not ready: {last_error}")
            try:
                self.connect_once(timeout=min(10.0, max(remaining, 0.5)))
                return time.monotonic() - start
            except paramiko.BadHostKeyException:
                raise
            except (OSError, EOFError, paramiko.SSHException) as exc:
                last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            time.sleep(min(0.25, max(deadline - time.monotonic(), 0)))

    def exec(
        self, command: str, timeout: float, alive: Callable[[], str] | None = None
    ) -> RawResult:
        """Run ``command`` through the guest user's shell (see ``run_command``)."""
        transport = self._active_transport()
        status, out, err = run_command(transport, command, timeout, alive)
        return RawResult(status, _decode(out), _decode(err))

    def _active_transport(self) -> paramiko.Transport:
        transport = self.client.get_transport()
        if transport is None or not transport.is_active():
            raise ConnectionError("SSH connection is closed")
        return transport

    def put(
        self,
        local: Path,
        remote: str,
        timeout: float = TRANSFER_TIMEOUT,
        alive: Callable[[], str] | None = None,
    ) -> None:
        """Copy ``local`` to ``remote`` by SFTP (see ``_transfer``)."""
        self._transfer(lambda sftp: sftp.put(str(local), remote), timeout, alive)

    def get(
        self,
        remote: str,
        local: Path,
        timeout: float = TRANSFER_TIMEOUT,
        alive: Callable[[], str] | None = None,
    ) -> None:
        """Copy ``remote`` to ``local`` by SFTP (see ``_transfer``)."""
        self._transfer(lambda sftp: sftp.get(remote, str(local)), timeout, alive)

    def _transfer(
        self,
        transfer: Callable[[paramiko.SFTPClient], object],
        timeout: float,
        alive: Callable[[], str] | None,
    ) -> None:
        """Run ``transfer`` on a new SFTP session within ``timeout`` s.

        paramiko's SFTP calls wait without a limit, and a panicked guest's connection
        stays open, frozen. So a watchdog asks ``alive()`` before and about once a
        second during the transfer and, if the guest died (``GuestDied``) or the time
        ran out (``TransferTimeout``), closes the connection, which ends the blocked
        call; that exception is raised then."""
        transport = self._active_transport()
        watchdog = _Watchdog(transport, timeout, alive)
        try:
            with watchdog, _open_sftp(transport) as sftp:
                transfer(sftp)
        except (OSError, EOFError, paramiko.SSHException):
            if watchdog.verdict is not None:
                raise watchdog.verdict from None
            raise

    def is_active(self) -> bool:
        transport = self._client.get_transport() if self._client else None
        return bool(transport and transport.is_active())

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()


# After a command's exit status, how long its output may stay open with nothing on it
# before the command counts as done: a background process it started holds it open.
OUTPUT_GRACE = 3.0


def run_command(
    transport: paramiko.Transport,
    command: str | bytes,
    timeout: float,
    alive: Callable[[], str] | None = None,
) -> tuple[int, bytes, bytes]:
    """Run ``command`` on a new session channel; return its exit status, stdout, stderr.

    stdout and stderr are read concurrently until the channel's EOF: OpenSSH sends the
    exit status *before* the output still in the command's pipes, so an exit status is
    not the end of the output. A command that leaves a background process holding its
    output open ends once nothing has arrived for ``OUTPUT_GRACE`` s after its exit status.

    ``alive()`` returns "" while the guest lives, else what happened to it: it is
    asked before the command starts and about once a second while it runs, so a
    guest that panics (its TCP connection stays open, frozen) raises ``GuestDied``
    at once instead of running out the timeout (``CommandTimeout``). A connection lost
    mid-command raises ``ConnectionResetError`` rather than returning a made-up exit
    status."""
    watch = _Watch(timeout, alive)
    watch.check_alive(now=None)
    chan = transport.open_session(timeout=timeout)
    try:
        chan.exec_command(command)  # type: ignore[arg-type]  # paramiko takes bytes too
        chan.shutdown_write()
        out, err = _read_output(chan, watch)
        status = _wait_exit_status(chan, watch)
    finally:
        chan.close()
    if status == -1 and _connection_lost(transport):
        raise ConnectionResetError(
            "the SSH connection was lost while the command ran (no exit status)"
        )
    return status, b"".join(out), b"".join(err)


class _Watch:
    """A running command's deadline and its guest's alive checks; holds its output so
    far for the exceptions."""

    def __init__(self, timeout: float, alive: Callable[[], str] | None) -> None:
        now = time.monotonic()
        self.deadline = now + timeout
        self.alive = alive
        self.next_check = now + ALIVE_INTERVAL
        self.out: list[bytes] = []
        self.err: list[bytes] = []

    def check_alive(self, now: float | None) -> None:
        """Ask ``alive()`` now (``now=None``) or if a check is due; raise if dead."""
        if self.alive is None or (now is not None and now < self.next_check):
            return
        dead = self.alive()
        if dead:
            raise GuestDied(dead, *self._text())
        self.next_check = time.monotonic() + ALIVE_INTERVAL

    def wait_time(self) -> float:
        """Raise if the guest died or time is up; else how long to wait at most."""
        now = time.monotonic()
        self.check_alive(now)
        remaining = self.deadline - now
        if remaining <= 0:
            raise CommandTimeout(*self._text())
        wait = min(remaining, 1.0)
        if self.alive is not None:
            wait = min(wait, max(self.next_check - now, 0.01))
        return wait

    def _text(self) -> tuple[str, str]:
        return _decode(b"".join(self.out)), _decode(b"".join(self.err))


def _read_output(chan: paramiko.Channel, watch: _Watch) -> tuple[list[bytes], list[bytes]]:
    """Read stdout and stderr until EOF (or the channel closed, or the grace after the
    exit status ran out)."""
    quiet_since: float | None = None  # the exit status is in and nothing arrived since
    while True:
        # Looked at before draining: all data arrives before EOF, so once EOF was seen,
        # one drain reads the rest.
        ended = chan.eof_received or chan.closed
        got = _drain(chan, watch)
        if ended:
            return watch.out, watch.err
        wait = watch.wait_time()
        if chan.exit_status_ready():
            now = time.monotonic()
            if got or quiet_since is None:
                quiet_since = now
            elif now - quiet_since >= OUTPUT_GRACE:
                return watch.out, watch.err  # a background process holds the output
            wait = min(wait, quiet_since + OUTPUT_GRACE - now)
        select.select([chan], [], [], max(wait, 0.0))


def _drain(chan: paramiko.Channel, watch: _Watch) -> bool:
    """Read what has arrived on stdout and stderr; whether there was anything."""
    got = False
    while chan.recv_ready():
        watch.out.append(chan.recv(65536))
        got = True
    while chan.recv_stderr_ready():
        watch.err.append(chan.recv_stderr(65536))
        got = True
    return got


def _wait_exit_status(chan: paramiko.Channel, watch: _Watch) -> int:
    """The exit status, which may come after EOF; -1 if the channel closed without one."""
    while not chan.exit_status_ready():
        chan.status_event.wait(watch.wait_time())
    return chan.recv_exit_status()


class _Watchdog:
    """While a block runs: asks ``alive()`` at once and then every ``ALIVE_INTERVAL``,
    and closes ``transport`` when the guest died or ``timeout`` passed, saying why in
    ``verdict``. A dead guest is raised at once, without closing anything."""

    def __init__(
        self, transport: paramiko.Transport, timeout: float, alive: Callable[[], str] | None
    ) -> None:
        self.transport = transport
        self.timeout = timeout
        self.alive = alive
        self.verdict: GuestDied | TransferTimeout | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="pytest-kvm-watchdog",
                                        daemon=True)  # fmt: skip

    def __enter__(self) -> _Watchdog:
        dead = self.alive() if self.alive is not None else ""
        if dead:
            raise GuestDied(dead)
        self._deadline = time.monotonic() + self.timeout
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._done.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._done.wait(min(ALIVE_INTERVAL, max(self._deadline - time.monotonic(), 0))):
            dead = self.alive() if self.alive is not None else ""
            if dead:
                self.verdict = GuestDied(dead)
            elif time.monotonic() >= self._deadline:
                self.verdict = TransferTimeout(f"did not finish within {self.timeout:.0f} s")
            if self.verdict is not None:
                self.transport.close()  # the blocked call ends with EOFError or OSError
                return


def _open_sftp(transport: paramiko.Transport) -> paramiko.SFTPClient:
    sftp = paramiko.SFTPClient.from_transport(transport)
    if sftp is None:  # paramiko's answer when the session channel could not be opened
        raise paramiko.SSHException("could not open an SFTP session")
    return sftp


def _connection_lost(transport: paramiko.Transport, grace: float = 1.0) -> bool:
    """A channel closed without an exit status: was the whole connection lost (sshd
    killed, network gone), rather than the command killed by a signal (OpenSSH then
    sends ``exit-signal``, which paramiko does not record)? paramiko closes the
    channels of a lost connection just before it marks the transport inactive."""
    end = time.monotonic() + grace
    while transport.is_active():
        if time.monotonic() >= end:
            return False
        time.sleep(0.02)
    return True


def _decode(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
