"""Guest faults without guests: a command whose guest dies, a lost connection, a full
host disk. paramiko's transport and channel are fakes; the select loop is real."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pytest_kvm.accel import AccelChoice
from pytest_kvm.console import Console
from pytest_kvm.errors import GuestCrashed, GuestError, HostDiskFull
from pytest_kvm.guest import Guest, GuestConfig
from pytest_kvm.images import Image, overlay
from pytest_kvm.run import RunContext
from pytest_kvm.ssh import CommandTimeout, GuestDied, KeyPair, SshSession
from tests.support.machine import FakeMachine

PANIC = "[   51.2] Kernel panic - not syncing: sysrq triggered crash"


class FakeChannel:
    """A session channel: ``script`` is what the guest does, one step per poll."""

    def __init__(self, steps: list[Callable[[FakeChannel], None]]) -> None:
        self._sock, self._peer = socket.socketpair()  # readable once it ended
        self.steps = steps
        self.polls = 0
        self.out = b""
        self.closed = False
        self.exit_status = -1
        self.command = ""

    def fileno(self) -> int:
        return self._sock.fileno()

    def exec_command(self, command: str) -> None:
        self.command = command

    def shutdown_write(self) -> None:
        pass

    def recv_ready(self) -> bool:
        ended = self.exit_status_ready()
        if self.polls < len(self.steps):
            self.steps[self.polls](self)
        self.polls += 1
        if not ended and self.exit_status_ready():
            self._peer.send(b"!")  # like paramiko's pipe: readable once the channel ends
        return bool(self.out)

    def recv(self, size: int) -> bytes:
        data, self.out = self.out, b""
        return data

    def recv_stderr_ready(self) -> bool:
        return False

    def recv_stderr(self, size: int) -> bytes:
        return b""

    def exit_status_ready(self) -> bool:
        return self.closed or self.exit_status != -1

    def recv_exit_status(self) -> int:
        return self.exit_status

    # These commands end their output as they exit (EOF comes with the exit status).
    @property
    def eof_received(self) -> bool:
        return self.exit_status_ready()

    @property
    def status_event(self) -> threading.Event:
        event = threading.Event()
        if self.exit_status_ready():
            event.set()
        return event

    def close(self) -> None:
        self._sock.close()
        self._peer.close()


class FakeTransport:
    def __init__(self, channel: FakeChannel) -> None:
        self.channel = channel
        self.active = True
        self.opened = 0

    def is_active(self) -> bool:
        return self.active

    def open_session(self, timeout: float | None = None) -> FakeChannel:
        self.opened += 1
        return self.channel


class FakeClient:
    def __init__(self, transport: FakeTransport) -> None:
        self.transport = transport

    def get_transport(self) -> FakeTransport:
        return self.transport

    def close(self) -> None:
        self.transport.active = False


def session_with(channel: FakeChannel) -> tuple[SshSession, FakeTransport]:
    key = KeyPair.generate()
    session = SshSession("127.0.0.1", 2222, "root", key, key)
    transport = FakeTransport(channel)
    session._client = FakeClient(transport)  # type: ignore[assignment]
    return session, transport


def idle(channel: FakeChannel) -> None:
    pass


def test_exec_asks_alive_while_the_command_runs_and_stops_when_the_guest_died():
    channel = FakeChannel([lambda c: setattr(c, "out", b"partial\n")] + [idle] * 1000)
    session, _ = session_with(channel)
    answers = iter(["", "", "guest 'g' panicked: Kernel panic - not syncing: x"])
    calls = []

    def alive() -> str:
        calls.append(1)
        return next(answers)

    with pytest.raises(GuestDied) as info:
        session.exec("sleep 1000", timeout=600, alive=alive)
    # Before the command, then once a second: the third answer ended it, long before
    # the 600 s timeout (a CommandTimeout would mean it waited that out).
    assert len(calls) == 3
    assert info.value.reason.endswith("Kernel panic - not syncing: x")
    assert info.value.stdout == "partial\n"
    assert channel.command == "sleep 1000"


def test_exec_does_not_open_a_channel_on_a_dead_guest():
    session, transport = session_with(FakeChannel([]))
    with pytest.raises(GuestDied, match="QEMU exited"):
        session.exec("true", timeout=600, alive=lambda: "QEMU exited (status 0)")
    assert transport.opened == 0


def test_exec_without_alive_still_times_out_with_the_output_so_far():
    channel = FakeChannel([lambda c: setattr(c, "out", b"started\n")] + [idle] * 1000)
    session, _ = session_with(channel)
    with pytest.raises(CommandTimeout) as info:
        session.exec("echo started; sleep 30", timeout=0.3)
    assert info.value.stdout == "started\n"


def test_exec_returns_the_result_of_a_command_that_finishes():
    def finish(c: FakeChannel) -> None:
        c.out = b"hello\n"
        c.exit_status = 3

    session, _ = session_with(FakeChannel([finish]))
    result = session.exec("echo hello; exit 3", timeout=10, alive=lambda: "")
    assert (result.exit_status, result.stdout, result.stderr) == (3, "hello\n", "")


def test_a_connection_lost_mid_command_is_an_error_not_an_exit_status():
    channel = FakeChannel([idle, lambda c: setattr(c, "closed", True)])
    session, transport = session_with(channel)
    channel.steps[1] = lambda c: (setattr(c, "closed", True), setattr(transport, "active", False))
    with pytest.raises(ConnectionResetError, match="connection was lost"):
        session.exec("kill sshd", timeout=10, alive=lambda: "")


def test_a_command_killed_by_a_signal_still_returns():
    # OpenSSH reports a signal death as exit-signal, which paramiko leaves as -1; the
    # connection stays up, so that is a result, not a lost connection.
    channel = FakeChannel([idle, lambda c: setattr(c, "closed", True)])
    session, _ = session_with(channel)
    assert session.exec("kill -9 $$", timeout=10).exit_status == -1


# -- Guest.run: the error a test sees --------------------------------------------------


@pytest.fixture
def run_context():
    context = RunContext(AccelChoice("tcg", "test"))
    yield context
    context.close()


def fake_guest(run: RunContext, tmp_path: Path, channel: FakeChannel) -> Guest:
    guest = Guest(run, GuestConfig(image=Image("img", Path("/nonexistent"), "qcow2", "img")))
    log = tmp_path / "serial.log"
    boot = "".join(f"[   {n:2}.0] booting, line {n}\n" for n in range(40))
    log.write_text("[    0.0] Linux version 6.1.0\n" + boot + "login: \n")
    guest.console = Console(log, tmp_path / "console.sock", guest.describe())
    guest.machine = FakeMachine()  # type: ignore[assignment]
    guest._ssh, _ = session_with(channel)
    return guest


def test_run_turns_a_panic_into_guest_crashed_with_the_panic_and_console_tail(
    run_context, tmp_path
):
    log = tmp_path / "serial.log"

    def panic(c: FakeChannel) -> None:
        with log.open("a") as out:
            out.write("[   51.1] sysrq: Trigger a crash\n" + PANIC + "\n")

    guest = fake_guest(run_context, tmp_path, FakeChannel([idle, panic] + [idle] * 1000))
    with pytest.raises(GuestCrashed) as info:
        guest.run("echo c > /proc/sysrq-trigger", timeout=600)
    message = str(info.value)
    assert f"guest {guest.name!r} (img) panicked: Kernel panic - not syncing" in message
    assert "command 'echo c > /proc/sysrq-trigger' was running" in message
    # The console from just before the panic: what triggered it.
    assert (
        "console:\n[   39.0] booting, line 39\nlogin: \n"
        "[   51.1] sysrq: Trigger a crash\n[   51.2] Kernel panic" in message
    )
    assert info.value.guest == guest.name


def test_run_on_a_guest_whose_qemu_exited_is_guest_crashed(run_context, tmp_path):
    guest = fake_guest(run_context, tmp_path, FakeChannel([idle] * 1000))
    guest.machine.running = False  # type: ignore[union-attr]
    with pytest.raises(GuestCrashed, match="QEMU exited"):
        guest.run("true", timeout=600)


def test_run_on_a_lost_connection_says_so_and_points_at_the_console(run_context, tmp_path):
    channel = FakeChannel([idle, lambda c: setattr(c, "closed", True)])
    guest = fake_guest(run_context, tmp_path, channel)
    transport = guest._ssh.client.get_transport()  # type: ignore[union-attr]
    channel.steps[1] = lambda c: (setattr(c, "closed", True), setattr(transport, "active", False))
    with pytest.raises(GuestError) as info:
        guest.run("systemctl stop ssh", timeout=600)
    assert type(info.value) is GuestError
    message = str(info.value)
    assert "connection was lost while the command ran" in message
    assert "guest.console" in message


# -- the host's disk ---------------------------------------------------------------------


def fake_statvfs(free_bytes: int) -> Callable[[Any], os.statvfs_result]:
    def statvfs(path: Any) -> os.statvfs_result:
        # f_bsize, f_frsize, f_blocks, f_bfree, f_bavail, f_files, f_ffree, f_favail,
        # f_flag, f_namemax
        blocks = free_bytes // 4096
        return os.statvfs_result((4096, 4096, 1 << 20, blocks, blocks, 0, 0, 0, 0, 255))

    return statvfs


@pytest.fixture
def no_qemu_img(monkeypatch):
    def refuse(*args: str, **kwargs: Any) -> None:
        raise AssertionError(f"qemu-img ran: {args}")

    monkeypatch.setattr(overlay, "qemu_img", refuse)


def test_overlay_on_a_full_host_disk_is_refused_before_qemu_img(monkeypatch, tmp_path, no_qemu_img):
    monkeypatch.setattr(overlay.os, "statvfs", fake_statvfs(10 << 20))
    with pytest.raises(HostDiskFull) as info:
        overlay.create_overlay(Path("/base.qcow2"), "qcow2", tmp_path / "disk.qcow2")
    message = str(info.value)
    assert f"only 10.0 MiB free in {str(tmp_path)!r}" in message
    assert "needs at least 64 MiB" in message
    assert "PYTEST_KVM_RUNTIME_DIR" in message
    assert list(tmp_path.iterdir()) == []


def test_blank_disk_needs_the_same_minimum_whatever_its_size(monkeypatch, tmp_path, no_qemu_img):
    monkeypatch.setattr(overlay.os, "statvfs", fake_statvfs(63 << 20))
    with pytest.raises(HostDiskFull, match=r"only 63\.0 MiB free .* needs at least 64 MiB"):
        overlay.create_blank_disk(tmp_path / "disk.qcow2", 8 << 30)


def test_enough_space_passes_and_a_missing_directory_is_clear(monkeypatch, tmp_path):
    overlay.check_free_space(tmp_path, needed=1)
    with pytest.raises(HostDiskFull, match="No such file or directory"):
        overlay.check_free_space(tmp_path / "gone")
    monkeypatch.setattr(overlay.os, "statvfs", fake_statvfs(64 << 20))
    overlay.check_free_space(tmp_path)  # exactly the minimum is enough
