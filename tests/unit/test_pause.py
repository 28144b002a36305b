"""pause.py's logic: the lines that say how to reach a guest (both backends, with and
without a display), when standard input can be waited on, the xdist refusal."""

from __future__ import annotations

import os
import types
from pathlib import Path
from typing import Any

import pytest

from pytest_kvm import pause
from pytest_kvm.config import Settings
from pytest_kvm.errors import KvmConfigError


def stand_in(tmp_path: Path, **changes: Any) -> Any:
    guest = types.SimpleNamespace(
        machine=types.SimpleNamespace(spec=types.SimpleNamespace(
            console_socket=tmp_path / "con sock")),
        is_running=True,
        backend="qemu",
        config=types.SimpleNamespace(ssh=True),
        ssh_command="ssh -p 2222 root@127.0.0.1",
        has_display=False,
        vnc=None,
        vnc_password_file=None,
        serial_log=tmp_path / "serial.log",
        describe=lambda: "guest 'g' (debian-12)",
    )  # fmt: skip
    for key, value in changes.items():
        setattr(guest, key, value)
    return guest


def test_qemu_lines_name_ssh_console_and_log(tmp_path: Path):
    lines = pause.reach_lines(stand_in(tmp_path))
    assert lines[0] == "guest 'g' (debian-12): running"
    assert "  ssh:        ssh -p 2222 root@127.0.0.1" in lines
    assert f"  console:    socat -,raw,echo=0 UNIX-CONNECT:'{tmp_path}/con sock'" in lines
    assert f"  serial log: {tmp_path}/serial.log" in lines
    assert not any("vnc" in line for line in lines)


def test_libvirt_console_is_input_with_output_in_the_log(tmp_path: Path):
    lines = pause.reach_lines(stand_in(tmp_path, backend="libvirt"))
    console = next(line for line in lines if "console:" in line)
    assert f"socat - UNIX-CONNECT:'{tmp_path}/con sock'" in console
    assert f"tail -f {tmp_path}/serial.log" in console


def test_display_lines(tmp_path: Path):
    with_vnc = pause.reach_lines(
        stand_in(tmp_path, has_display=True, vnc=("127.0.0.1", 5903),
                 vnc_password_file=tmp_path / "vnc-password")
    )  # fmt: skip
    assert (
        f"  vnc:        127.0.0.1:5903 (display :3), password in {tmp_path}/vnc-password"
        in with_vnc
    )
    without = pause.reach_lines(stand_in(tmp_path, has_display=True))
    assert "  vnc:        none (--kvm-vnc adds one); guest.screenshot() works" in without


def test_a_stopped_guest_or_one_without_ssh(tmp_path: Path):
    assert pause.reach_lines(stand_in(tmp_path, is_running=False)) == [
        "guest 'g' (debian-12): not running"
    ]
    no_ssh = pause.reach_lines(stand_in(tmp_path, config=types.SimpleNamespace(ssh=False)))
    assert not any("ssh:" in line for line in no_ssh)


def test_stdin_waitable(monkeypatch):
    read, write = os.pipe()
    try:
        with os.fdopen(os.dup(read)) as pipe:
            monkeypatch.setattr("sys.stdin", pipe)
            assert pause.stdin_waitable()
        with open(os.devnull) as null:
            monkeypatch.setattr("sys.stdin", null)
            assert not pause.stdin_waitable()
        monkeypatch.setattr("sys.stdin", None)
        assert not pause.stdin_waitable()
    finally:
        os.close(read)
        os.close(write)


def fake_config(
    option: bool | None = True, worker: bool = False, dist: str = "no", n: int | None = None
) -> Any:
    config = types.SimpleNamespace(
        option=types.SimpleNamespace(dist=dist, numprocesses=n, tx=None),
        getoption=lambda name: option,
    )
    if worker:
        config.workerinput = {}
    return config


@pytest.mark.parametrize(
    "config",
    [fake_config(worker=True), fake_config(dist="load", n=2)],
    ids=["worker", "controller"],
)
def test_xdist_is_refused(config):
    with pytest.raises(KvmConfigError, match=r"^command line --kvm-pause-on-failure: .*xdist"):
        pause.check(config, Settings(pause_on_failure=True))


def test_no_refusal_without_xdist_or_without_the_option():
    pause.check(fake_config(), Settings(pause_on_failure=True))
    pause.check(fake_config(dist="load", n=0), Settings(pause_on_failure=True))
    pause.check(fake_config(option=None, worker=True), Settings())


def test_source_of_the_option():
    assert pause.option_source(fake_config(option=None), {}) == "ini kvm_pause_on_failure"
    env = {"PYTEST_KVM_PAUSE_ON_FAILURE": "1"}
    assert (
        pause.option_source(fake_config(option=None), env)
        == "environment PYTEST_KVM_PAUSE_ON_FAILURE"
    )
