"""guest.put / guest.get with hostile file names: they work literally, or fail clearly.

SFTP takes paths as data, not as shell words, so a name like ``$(touch /tmp/pwned)``
must become a file of exactly that name and run nothing. Every check that reads the
guest back quotes the path with ``shlex.quote``.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from pytest_kvm.errors import GuestError, KvmConfigError

pytestmark = pytest.mark.integration

HOSTILE_NAMES = [
    "with space",
    "  leading and trailing  ",
    'it\'s "quoted"',
    "$(touch pwned-dollar)",
    "`touch pwned-backtick`",
    "a;touch pwned-semicolon",
    "a|touch pwned-pipe&",
    "line\nbreak",
    "tab\there",
    "-leading-dash",
    "--help",
    "glob*?[x]{a,b}",
    "back\\slash",
    "ünïcödé €",
    "~tilde",
    "> redirect <",
]
REMOTE_DIR = "/tmp/hostile dir 'x'"


def _assert_nothing_ran(guest) -> None:
    """No file that the names' commands would have made, anywhere on the root file system."""
    found = guest.succeed("find / -xdev -name 'pwned-*' -print")
    assert found == "", f"a command in a file name ran: {found}"


def _guest_names(guest, directory: str) -> set[str]:
    """The exact names in ``directory`` in the guest (NUL-separated, so newlines survive)."""
    out = guest.succeed(f"find {shlex.quote(directory)} -mindepth 1 -maxdepth 1 -printf '%f\\0'")
    return {name for name in out.split("\0") if name}


def test_hostile_remote_names_work_literally(kvm_guest, tmp_path: Path):
    g = kvm_guest
    g.succeed(f"mkdir -p {shlex.quote(REMOTE_DIR)}")
    for index, name in enumerate(HOSTILE_NAMES):
        local = tmp_path / f"in-{index}"
        local.write_text(f"content {index}: {name}\n")
        g.put(local, f"{REMOTE_DIR}/{name}")
    # Exactly these names appear, and nothing ran.
    assert _guest_names(g, REMOTE_DIR) == set(HOSTILE_NAMES)
    _assert_nothing_ran(g)
    for index, name in enumerate(HOSTILE_NAMES):
        remote = f"{REMOTE_DIR}/{name}"
        assert g.succeed(f"cat -- {shlex.quote(remote)}") == f"content {index}: {name}\n"
        back = g.get(remote, tmp_path / f"out-{index}")
        assert back.read_text() == f"content {index}: {name}\n"
    _assert_nothing_ran(g)


def test_hostile_local_names_work_literally(kvm_guest, tmp_path: Path):
    g = kvm_guest
    local_dir = tmp_path / "local dir 'with' \"quotes\" $(touch pwned)"
    local_dir.mkdir()
    for index, name in enumerate(["with space", "$(touch pwned)", "line\nbreak", "-dash"]):
        source = local_dir / name
        source.write_bytes(bytes(range(256)) * 4 + name.encode())
        g.put(source, f"/tmp/plain-{index}")
        back = g.get(f"/tmp/plain-{index}", local_dir / f"back {name}")
        assert back == local_dir / f"back {name}"
        assert back.read_bytes() == source.read_bytes()
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def test_bad_remote_paths_give_clear_errors(kvm_guest, tmp_path: Path):
    g = kvm_guest
    local = tmp_path / "x"
    local.write_text("x\n")
    cases = [
        # (remote, what the message must say)
        ("/nonexistent dir/$(id)/file", "No such file"),
        ("/tmp", ""),  # a directory: put cannot replace it
    ]
    for remote, needle in cases:
        with pytest.raises(GuestError) as info:
            g.put(local, remote)
        message = str(info.value)
        assert g.name in message and repr(remote) in message, message
        assert needle in message, message
    # get of something missing names the remote path and leaves no local file.
    dest = tmp_path / "never"
    with pytest.raises(GuestError) as info:
        g.get("/tmp/does not exist $(id)", dest)
    assert "'/tmp/does not exist $(id)'" in str(info.value)
    assert not dest.exists()
    # get of a directory: a clear error too.
    with pytest.raises(GuestError) as info:
        g.get("/etc", tmp_path / "etc-copy")
    assert "'/etc'" in str(info.value)
    assert not (tmp_path / "etc-copy").exists()
    # An empty path, or one with a NUL, is refused before anything is sent (a NUL
    # would end the SFTP session), naming the path.
    for remote in ("", "/tmp/nul\0byte"):
        with pytest.raises(KvmConfigError) as info:
            g.put(local, remote)
        assert f"put: remote path {remote!r} is not a path" in str(info.value)
        with pytest.raises(KvmConfigError) as info:
            g.get(remote, tmp_path / "nul")
        assert f"get: remote path {remote!r} is not a path" in str(info.value)
    g.fail("test -e /tmp/nul")
    assert g.succeed("echo still connected") == "still connected\n"
    # A local path that is not a file is the caller's mistake, named as given.
    with pytest.raises(KvmConfigError, match="'/no such/local file' is not a file"):
        g.put("/no such/local file", "/tmp/y")
