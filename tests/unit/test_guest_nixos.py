"""The NixOS driver's names (guest/nixos.py) and the commands behind the new ones
(guest/commands.py): what goes to the guest's shell (quoted), retries, errors, and a
directory copied by copy_from_host. A fake SSH session answers from a script."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pytest_kvm.errors import GuestTimeout, KvmConfigError
from pytest_kvm.guest import Guest
from pytest_kvm.guest.commands import Commands, host_tree, join_remote
from pytest_kvm.guest.nixos import NixosNames
from pytest_kvm.ssh import RawResult


class FakeSession:
    """Runs nothing: ``answer(command)`` says the exit status; puts are recorded."""

    def __init__(self, answer: Callable[[str], int]) -> None:
        self.answer = answer
        self.commands: list[str] = []
        self.puts: list[tuple[Path, str]] = []

    def is_active(self) -> bool:
        return True

    def exec(self, command: str, timeout: float, alive: Any = None) -> RawResult:
        self.commands.append(command)
        status = self.answer(command)
        return RawResult(status, f"out {len(self.commands)}\n" if status else "", "")

    def put(self, local: Path, remote: str, timeout: float, alive: Any = None) -> None:
        self.puts.append((local, remote))


def commands_on(session: FakeSession) -> Commands:
    class Link:
        def current(self) -> Any:
            return session

        def reconnect(self, timeout: float, lost: str | None = None) -> None:
            raise AssertionError("reconnected")

        def connect(self, deadline: float) -> None:
            raise AssertionError("connected")

    return Commands(Link(), lambda: "", lambda: "", what="guest 'g' (img)", name="g",
                    timeout_scale=1.0, boot_timeout=60)  # fmt: skip


def test_wait_until_fails_retries_until_a_non_zero_exit():
    calls = iter([0, 0, 3])
    session = FakeSession(lambda cmd: next(calls))
    out = commands_on(session).wait_until_fails("systemctl is-active nginx", timeout=30)
    assert session.commands == ["systemctl is-active nginx"] * 3
    assert out == "out 3\n"


def test_wait_until_fails_times_out_saying_what_it_saw():
    session = FakeSession(lambda cmd: 0)
    with pytest.raises(GuestTimeout, match=r"command 'true' never failed within 0 s"):
        commands_on(session).wait_until_fails("true", timeout=0.01)


def test_wait_for_file_quotes_the_path():
    hostile = "/tmp/it's $(reboot) here"
    seen = iter([1, 0])
    session = FakeSession(lambda cmd: next(seen))
    commands_on(session).wait_for_file(hostile, timeout=30)
    assert session.commands == [f"test -e {shlex.quote(hostile)}"] * 2
    assert shlex.split(session.commands[0]) == ["test", "-e", hostile]


def test_wait_for_file_refuses_a_non_path_and_times_out_clearly():
    commands = commands_on(FakeSession(lambda cmd: 1))
    with pytest.raises(KvmConfigError, match="wait_for_file: remote path ''"):
        commands.wait_for_file("", timeout=1)
    with pytest.raises(GuestTimeout, match=r"'/nope' never appeared within"):
        commands.wait_for_file("/nope", timeout=0.01)


def test_copy_from_host_copies_a_directory_tree(tmp_path: Path):
    src = tmp_path / "site dir"
    (src / "css").mkdir(parents=True)
    (src / "empty").mkdir()
    (src / "index.html").write_text("hi")
    (src / "css" / "a b.css").write_text("x")
    assert host_tree(src) == (["index.html", "css/a b.css"], ["", "css", "empty"])
    session = FakeSession(lambda cmd: 0)
    commands_on(session).copy_from_host(src, "/srv/www's/")
    mkdir = shlex.split(session.commands[0])
    assert mkdir == ["mkdir", "-p", "--", "/srv/www's/", "/srv/www's/css", "/srv/www's/empty"]
    assert session.puts == [
        (src / "index.html", "/srv/www's/index.html"),
        (src / "css" / "a b.css", "/srv/www's/css/a b.css"),
    ]


def test_copy_from_host_of_a_file_is_put(tmp_path: Path):
    (tmp_path / "f").write_text("x")
    session = FakeSession(lambda cmd: 0)
    commands_on(session).copy_from_host(tmp_path / "f", "/etc/f")
    assert session.commands == [] and session.puts == [(tmp_path / "f", "/etc/f")]
    with pytest.raises(KvmConfigError, match="is not a file"):
        commands_on(session).copy_from_host(tmp_path / "missing", "/etc/f")


def test_join_remote():
    assert join_remote("/a/", "") == "/a/"
    assert join_remote("/a/", "b/c") == "/a/b/c"
    assert join_remote("/a", "b") == "/a/b"


def test_every_nixos_name_is_on_guest_and_documented():
    names = ["wait_for_open_port", "wait_until_fails", "wait_for_file", "send_chars",
             "get_screen_text", "copy_from_host"]  # fmt: skip
    for name in names:
        assert callable(getattr(Guest, name)), name
        assert getattr(NixosNames, name).__doc__, name


def test_aliases_call_the_guest_methods_they_name():
    calls: list[tuple[str, tuple[Any, ...]]] = []

    class Recorder(NixosNames):
        def wait_for_port(self, port: int, timeout: float = 120) -> None:
            calls.append(("wait_for_port", (port, timeout)))

        def type_text(self, text: str, delay: float = 0.02) -> None:
            calls.append(("type_text", (text, delay)))

        def screen_text(self) -> str:
            calls.append(("screen_text", ()))
            return "login:"

    guest = Recorder()
    guest.wait_for_open_port(80, timeout=5)
    guest.send_chars("root\n")
    assert guest.get_screen_text() == "login:"
    assert calls == [
        ("wait_for_port", (80, 5)),
        ("type_text", ("root\n", 0.02)),
        ("screen_text", ()),
    ]
