"""Customisations, encrypted-drive arguments, secret files and journal lines: logic only."""

from __future__ import annotations

import builtins
import os
import stat
import subprocess
from pathlib import Path

import pytest

from pytest_kvm.backends.base import Drive, MachineSpec
from pytest_kvm.backends.qemu import build_argv
from pytest_kvm.config import Settings, _secret_file
from pytest_kvm.customize import Customization, _format_entry, load_guestfs
from pytest_kvm.errors import KvmConfigError, KvmUnavailable
from pytest_kvm.images.overlay import (
    SECRET_ID,
    create_overlay,
    encrypt_image,
    encrypted_chain,
    key_secret_opts,
)
from pytest_kvm.network import NetworkSpec


def test_customization_validates_and_normalises(tmp_path):
    tool = tmp_path / "tool"
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    c = Customization.build(
        files={
            "/etc/b": "text",
            "/etc/a": b"\x00bytes",
            "/usr/bin/t": tool,
            "/etc/k": ("k", 0o600),
        },
        hostname="web-1",
        run="echo one",
    )
    assert [f.path for f in c.files] == ["/etc/a", "/etc/b", "/etc/k", "/usr/bin/t"]
    modes = {f.path: f.mode for f in c.files}
    assert modes == {"/etc/a": 0o644, "/etc/b": 0o644, "/etc/k": 0o600, "/usr/bin/t": 0o755}
    assert c.run == ("echo one",) and c.hostname == "web-1"
    assert c.summary() == "4 files, hostname web-1, 1 command"
    assert not Customization() and c


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"files": {"etc/x": "a"}}, "is not an absolute guest path"),
        ({"files": {"/etc/../x": "a"}}, "is not a plain path"),
        ({"files": {"/etc/x/": "a"}}, "is not a plain path"),
        ({"files": {"/": "a"}}, "is not a plain path"),
        ({"files": {"/etc/x": 3}}, "give text, bytes, a pathlib.Path"),
        ({"files": {"/etc/x": ("a", 0o17777)}}, "is not a mode"),
        ({"files": {"/etc/x": ("a",)}}, "use (content, mode)"),
        ({"files": {"/etc/x": Path("/nonexistent/file")}}, "does not exist"),
        ({"files": ["/etc/x"]}, "must map guest paths"),
        ({"hostname": "bad_name!"}, "is not a host name"),
        ({"run": [""]}, "run= takes shell command strings"),
        ({"run": ["ok", 5]}, "run= takes shell command strings"),
    ],
)
def test_bad_customizations_are_clear_errors(kwargs, needle):
    with pytest.raises(KvmConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        Customization.build(**kwargs, where="t")


def test_digest_follows_content_not_order_and_merge_layers():
    a = Customization.build(files={"/a": "1", "/b": "2"}, run=["x"])
    b = Customization.build(files={"/b": "2", "/a": "1"}, run=["x"])
    assert a.digest() == b.digest()
    assert a.digest() != Customization.build(files={"/a": "1", "/b": "3"}, run=["x"]).digest()
    assert (
        a.digest() != Customization.build(files={"/a": ("1", 0o600), "/b": "2"}, run=["x"]).digest()
    )
    merged = a.merged(Customization.build(files={"/b": "new"}, hostname="h", run=["y"]))
    assert {f.path: f.content for f in merged.files} == {"/a": b"1", "/b": b"new"}
    assert merged.run == ("x", "y") and merged.hostname == "h"


def test_marker_customisation_merges_module_then_function():
    s = Settings().with_marker({"files": {"/m": "module"}, "run": ["first"]}, "mod")
    s = s.with_marker({"files": {"/f": "function"}, "run": "second", "memory": 512}, "fn")
    assert [f.path for f in s.customize.files] == ["/f", "/m"]
    assert s.customize.run == ("first", "second") and s.memory == 512
    with pytest.raises(KvmConfigError, match=r"fn \(@pytest.mark.kvm\): files= key 'x'"):
        Settings().with_marker({"files": {"x": "y"}}, "fn")


def test_key_secret_options_cover_every_encrypted_layer():
    assert key_secret_opts(()) == ""
    assert key_secret_opts((True,)) == f"encrypt.key-secret={SECRET_ID}"
    assert key_secret_opts((True, False, True)) == (
        f"encrypt.key-secret={SECRET_ID},backing.backing.encrypt.key-secret={SECRET_ID}"
    )


def test_encrypted_drive_argv_names_the_secret_file_only(tmp_path):
    secret = tmp_path / "key"
    spec = MachineSpec(
        name="kvm-ab12-main-01",
        workdir=tmp_path,
        drives=(
            Drive(tmp_path / "disk.qcow2", encrypted=(True, True), secret=secret),
            Drive(tmp_path / "seed.iso", "raw", readonly=True),
        ),
        memory=1024, cpus=2, accel="tcg", network=NetworkSpec("user"),
        mac="02:6b:76:00:00:01", ssh_port=40022,
    )  # fmt: skip
    argv = build_argv(spec)
    objects = [argv[i + 1] for i, a in enumerate(argv) if a == "-object"]
    assert objects == [f"secret,id={SECRET_ID},file={secret},format=raw"]
    drive = next(argv[i + 1] for i, a in enumerate(argv) if a == "-drive")
    assert f",encrypt.key-secret={SECRET_ID},backing.encrypt.key-secret={SECRET_ID}," in drive


def test_encrypted_overlay_is_encrypted_with_the_same_key(tmp_path):
    key = tmp_path / "key"
    key.write_bytes(b"k3y")
    plain = tmp_path / "plain.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(plain), "1M"], check=True)
    # Through the helper that retries QEMU 7.2's flaky LUKS benchmark (CI lost a run).
    base = encrypt_image(plain, "qcow2", tmp_path / "base.qcow2", key, iter_time_ms=10)
    top = create_overlay(base, "qcow2", tmp_path / "top.qcow2", size=1 << 20, secret=key)
    assert encrypted_chain(top) == (True, True)
    assert stat.S_IMODE(top.stat().st_mode) == 0o600


def test_secret_file_must_be_private_and_ours(tmp_path):
    key = tmp_path / "key"
    key.write_text("s")
    key.chmod(0o600)
    assert _secret_file(str(key), "cli") == key.resolve()
    key.chmod(0o640)
    with pytest.raises(KvmConfigError, match=r"readable by others \(mode 640\); chmod 600 it"):
        _secret_file(str(key), "cli")
    with pytest.raises(KvmConfigError, match="No such file"):
        _secret_file(str(tmp_path / "none"), "cli")
    empty = tmp_path / "empty"
    fd = os.open(empty, os.O_CREAT | os.O_WRONLY, 0o600)
    os.close(fd)
    with pytest.raises(KvmConfigError, match="is empty"):
        _secret_file(str(empty), "cli")
    with pytest.raises(KvmConfigError, match="not a regular file"):
        _secret_file(str(tmp_path), "cli")


def test_journal_lines_look_like_journalctl():
    line = _format_entry(
        {"SYSLOG_IDENTIFIER": b"sshd", "_PID": b"42", "_HOSTNAME": b"web", "MESSAGE": b"hi"},
        1_700_000_000_000_000,
    )
    assert line == "Nov 14 22:13:20 web sshd[42]: hi"
    assert _format_entry({"_COMM": b"kernel", "MESSAGE": b"x"}, 0).endswith(" kernel: x")


def test_missing_libguestfs_is_unavailable_with_the_package(monkeypatch):
    real = builtins.__import__

    def no_guestfs(name, *args, **kwargs):
        if name == "guestfs":
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_guestfs)
    with pytest.raises(KvmUnavailable, match=r"libguestfs is not installed.*python3-guestfs"):
        load_guestfs("customising")


def test_a_libguestfs_call_that_never_answers_stops_its_appliance(tmp_path: Path) -> None:
    """libguestfs waits for its daemon for ever; the handle stops the appliance (its
    QEMU, by PID) after the limit, and the call fails with an ImageError."""
    import time

    from pytest_kvm.customize.handle import DiskHandle
    from pytest_kvm.customize.source import DiskSource
    from pytest_kvm.errors import ImageError

    appliance = subprocess.Popen(["sleep", "600"])

    class Hanging:
        def get_pid(self) -> int:
            return appliance.pid

        def inspect_os(self) -> list[str]:
            appliance.wait()  # the daemon never answers while its appliance lives
            raise RuntimeError("connection to the daemon lost")

    handle = DiskHandle(DiskSource(tmp_path / "d.qcow2"), readonly=True, force_tcg=True)
    handle.g = Hanging()
    t0 = time.monotonic()
    try:
        with (
            pytest.raises(ImageError, match=r"did not answer within 0 s \(inspecting"),
            handle.bounded(0.3, "inspecting its file systems"),
        ):
            handle.g.inspect_os()
        assert appliance.returncode == -9 and time.monotonic() - t0 < 30
        # a call that answers in time is left alone, and a plain failure stays what it is
        quick = subprocess.Popen(["sleep", "600"])
        handle.g.get_pid = lambda: quick.pid  # type: ignore[method-assign]
        with pytest.raises(RuntimeError, match="no such file"), handle.bounded(30, "reading /x"):
            raise RuntimeError("no such file")
        assert quick.poll() is None
        quick.kill()
        quick.wait()
    finally:
        if appliance.poll() is None:
            appliance.kill()
            appliance.wait()
