"""How a command's output is read off its SSH channel, shared by ``guest.run`` and
``guest.host`` (testinfra). The channel is a fake with paramiko's semantics: two
buffers, an EOF that closes both, an exit status that may come before the output
still in flight (OpenSSH sends it first); the select loop is real."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable

import pytest

from pytest_kvm import ssh
from pytest_kvm.errors import GuestTimeout
from pytest_kvm.guest.commands import Commands
from pytest_kvm.ssh import KeyPair, SshSession


class Channel:
    """paramiko.Channel as the loop sees it. ``on_status_check(channel, n)`` is the
    guest: it runs on each ``exit_status_ready()`` (n counts from 1)."""

    def __init__(self, on_status_check: Callable[[Channel, int], None]) -> None:
        self._sock, self._peer = socket.socketpair()
        self.on_status_check = on_status_check
        self.status_checks = 0
        self.out = bytearray()
        self.err = bytearray()
        self.eof_received = False
        self.closed = False
        self.status = -1
        self.status_event = threading.Event()

    # -- the guest's side
    def deliver(self, out: bytes = b"", err: bytes = b"") -> None:
        self.out += out
        self.err += err
        self._wake()

    def exit(self, status: int) -> None:
        self.status = status
        self.status_event.set()

    def eof(self) -> None:
        self.eof_received = True
        self._wake()

    def _wake(self) -> None:  # paramiko's pipe: readable while data or EOF waits
        if not self._readable():
            self._peer.send(b"!")

    def _readable(self) -> bool:
        self._sock.setblocking(False)
        try:
            return bool(self._sock.recv(1, socket.MSG_PEEK))
        except BlockingIOError:
            return False

    # -- paramiko's API
    def fileno(self) -> int:
        return self._sock.fileno()

    def exec_command(self, command: str | bytes) -> None:
        pass

    def shutdown_write(self) -> None:
        pass

    def recv_ready(self) -> bool:
        return bool(self.out)

    def recv_stderr_ready(self) -> bool:
        return bool(self.err)

    def recv(self, size: int) -> bytes:
        return self._take(self.out, size)

    def recv_stderr(self, size: int) -> bytes:
        return self._take(self.err, size)

    def _take(self, buffer: bytearray, size: int) -> bytes:
        data = bytes(buffer[:size])
        del buffer[:size]
        if not self.out and not self.err and not self.eof_received and self._readable():
            self._sock.recv(1)
        return data

    def exit_status_ready(self) -> bool:
        self.status_checks += 1
        self.on_status_check(self, self.status_checks)
        return self.closed or self.status != -1

    def recv_exit_status(self) -> int:
        return self.status

    def close(self) -> None:
        self._sock.close()
        self._peer.close()


class Transport:
    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    def is_active(self) -> bool:
        return True

    def open_session(self, timeout: float | None = None) -> Channel:
        return self.channel


class Client:
    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    def get_transport(self) -> Transport:
        return self.transport


def session_on(channel: Channel) -> SshSession:
    key = KeyPair.generate()
    session = SshSession("127.0.0.1", 2222, "root", key, key)
    session._client = Client(Transport(channel))  # type: ignore[assignment]
    return session


def last_chunk_between_the_checks(channel: Channel, check: int) -> None:
    """The race: the loop found both buffers empty, then, before it asks whether the
    exit status is in, the last chunk, the exit status and EOF arrive together."""
    if check == 1:
        channel.deliver(out=b"tail of stdout\n", err=b"tail of stderr\n")
        channel.exit(0)
        channel.eof()


def test_output_arriving_with_the_exit_status_between_the_checks_is_read():
    channel = Channel(last_chunk_between_the_checks)
    channel.deliver(out=b"head\n")
    result = session_on(channel).exec("cmd", timeout=10)
    assert (result.exit_status, result.stdout, result.stderr) == (
        0,
        "head\ntail of stdout\n",
        "tail of stderr\n",
    )


def test_testinfra_commands_use_the_same_loop():
    channel = Channel(last_chunk_between_the_checks)
    channel.deliver(out=b"head\n")
    session = session_on(channel)

    class Link:  # the guest's SSH session, which never needs reopening here
        def current(self) -> SshSession:
            return session

        def reconnect(self, timeout: float, lost: str | None = None) -> None:
            raise AssertionError("reconnected")

        def connect(self, deadline: float) -> None:
            raise AssertionError("connected")

    commands = Commands(Link(), lambda: "", lambda: "", what="guest 'g' (img)", name="g",
                        timeout_scale=1.0, boot_timeout=60)  # fmt: skip
    status, out, err = commands.exec_bytes(b"cmd", 10)  # what guest.host's commands use
    assert (status, out, err) == (0, b"head\ntail of stdout\n", b"tail of stderr\n")


def test_output_after_the_exit_status_is_read_until_eof():
    # OpenSSH's order when the command exits with output still in its pipes.
    def guest(channel: Channel, check: int) -> None:
        if check == 1:
            channel.exit(3)
        if check <= 3:
            channel.deliver(out=b"o%d" % check, err=b"e%d" % check)
        elif check == 4:
            channel.eof()

    result = session_on(Channel(guest)).exec("cmd", timeout=10)
    assert (result.exit_status, result.stdout, result.stderr) == (3, "o1o2o3", "e1e2e3")


def test_a_background_process_holding_the_output_ends_the_command_after_the_grace(
    monkeypatch,
):
    # `daemon &` without redirection: the shell's exit status comes, EOF never does.
    monkeypatch.setattr(ssh, "OUTPUT_GRACE", 0.3)

    def guest(channel: Channel, check: int) -> None:
        if check == 1:
            channel.deliver(out=b"started\n")
            channel.exit(0)

    start = time.monotonic()
    result = session_on(Channel(guest)).exec("daemon &", timeout=10)
    assert (result.exit_status, result.stdout) == (0, "started\n")
    assert 0.3 <= time.monotonic() - start < 2


def test_the_exit_status_may_come_after_eof():
    def guest(channel: Channel, check: int) -> None:
        if check == 1:
            channel.deliver(out=b"all\n")
            channel.eof()
            threading.Timer(0.05, channel.exit, (7,)).start()  # paramiko's thread

    result = session_on(Channel(guest)).exec("cmd", timeout=10)
    assert (result.exit_status, result.stdout) == (7, "all\n")


def test_a_command_that_closed_its_output_but_runs_on_times_out():
    def guest(channel: Channel, check: int) -> None:
        channel.eof()

    with pytest.raises(ssh.CommandTimeout):
        session_on(Channel(guest)).exec("exec >&- 2>&-; sleep 100", timeout=0.3)


# -- connecting: paramiko's log level stays the user's -----------------------------


@pytest.fixture
def closing_server():
    """A TCP port on 127.0.0.1 that accepts and hangs up at once: each SSH attempt
    fails reading the banner, which paramiko logs as an ERROR with a traceback."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    server.close()


def test_connects_from_threads_leave_paramikos_log_level_alone(closing_server, caplog, tmp_path):
    paramiko_log = logging.getLogger("paramiko.transport")
    before = paramiko_log.level
    paramiko_log.setLevel(logging.WARNING)  # the user's choice
    key = KeyPair.generate()
    errors: list[BaseException] = []

    def connect(delay: float, until: float) -> None:
        time.sleep(delay)
        key_file = tmp_path / f"key-{delay}"
        session = SshSession("127.0.0.1", closing_server, "root", key.save(key_file), key)
        try:
            session.connect(time.monotonic() + until)
        except GuestTimeout as exc:
            errors.append(exc)

    try:
        # Overlapping connects: the second starts after the first and ends after it.
        threads = [threading.Thread(target=connect, args=(d, u)) for d, u in [(0, 0.6), (0.2, 0.8)]]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert paramiko_log.level == logging.WARNING
        assert len(errors) == 2 and "not ready" in str(errors[0])
        # The failed attempts were quiet all the same.
        assert [r for r in caplog.records if r.name.startswith("paramiko")] == []
    finally:
        paramiko_log.setLevel(before)


# -- SFTP: a limit, and the guest's death seen while a transfer waits -------------


class BlockingSftp:
    """An SFTP client whose transfers wait, as paramiko's do on a frozen connection,
    until the connection is closed."""

    def __init__(self, closed: threading.Event) -> None:
        self.closed = closed

    def __enter__(self) -> BlockingSftp:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass

    def put(self, local: str, remote: str) -> None:
        self.closed.wait(30)
        raise EOFError  # what paramiko raises when its channel goes away

    get = put


class ClosableTransport:
    def __init__(self) -> None:
        self.closed = threading.Event()

    def is_active(self) -> bool:
        return not self.closed.is_set()

    def close(self) -> None:
        self.closed.set()


@pytest.fixture
def sftp_session(monkeypatch):
    transport = ClosableTransport()
    monkeypatch.setattr(ssh, "_open_sftp", lambda t: BlockingSftp(t.closed))
    key = KeyPair.generate()
    session = SshSession("127.0.0.1", 2222, "root", key, key)
    session._client = Client(transport)  # type: ignore[arg-type, assignment]
    return session, transport


def test_a_transfer_past_its_timeout_ends_and_closes_the_connection(sftp_session, tmp_path):
    session, transport = sftp_session
    start = time.monotonic()
    with pytest.raises(ssh.TransferTimeout, match="did not finish within 0 s"):
        session.put(tmp_path / "f", "/root/f", timeout=0.3)
    assert time.monotonic() - start < 2
    assert transport.closed.is_set()


def test_a_guest_that_dies_during_a_get_ends_it_within_about_a_second(
    sftp_session, tmp_path, monkeypatch
):
    monkeypatch.setattr(ssh, "ALIVE_INTERVAL", 0.1)
    session, transport = sftp_session
    answers = iter(["", "", "guest 'g' panicked: Kernel panic - not syncing: x"])
    with pytest.raises(ssh.GuestDied, match="Kernel panic") as info:
        session.get("/var/log/big", tmp_path / "big", timeout=600, alive=lambda: next(answers))
    assert info.value.reason.endswith("not syncing: x")
    assert transport.closed.is_set()
