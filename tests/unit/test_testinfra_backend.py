"""guest.host without testinfra installed: a clear error that says what to install."""

from __future__ import annotations

import sys

import pytest

from pytest_kvm.errors import KvmUnavailable
from pytest_kvm.testinfra_backend import MissingTestinfra, make_host


def test_missing_testinfra_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "testinfra.host", None)  # import fails
    monkeypatch.setitem(sys.modules, "testinfra.backend.paramiko", None)
    with pytest.raises(MissingTestinfra) as info:
        make_host("guest 'kvm-0000-main-01' (debian-12)", "root@127.0.0.1:2222", None)  # type: ignore[arg-type]
    assert isinstance(info.value, ImportError) and isinstance(info.value, KvmUnavailable)
    assert "guest 'kvm-0000-main-01' (debian-12): guest.host needs testinfra" in str(info.value)
    assert "pip install 'pytest-kvm[testinfra]'" in str(info.value)


class FakeCommands:
    """A guest's command vocabulary, as make_host uses it."""

    def __init__(self) -> None:
        self.seen: list[tuple[bytes, float]] = []

    def exec_bytes(self, command: bytes, timeout: float) -> tuple[int, bytes, bytes]:
        self.seen.append((command, timeout))
        return 3, b"out\xff", b"err"

    def ssh_client(self) -> str:
        return "the guest's client"


def test_testinfra_commands_go_through_the_guests_commands():
    pytest.importorskip("testinfra")
    commands = FakeCommands()
    host = make_host("guest 'g' (img)", "root@127.0.0.1:2222", commands)  # type: ignore[arg-type]
    result = host.run("echo %s", "a b")
    assert (result.rc, result.stdout_bytes, result.stderr_bytes) == (3, b"out\xff", b"err")
    assert commands.seen == [(b"echo 'a b'", 300.0)]
    assert host.backend.client == "the guest's client"  # never a connection of its own
