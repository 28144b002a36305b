"""QemuMachine's start-up failure path, with a fake QEMU binary (a shell script)."""

import os
import stat
from pathlib import Path

import pytest

from pytest_kvm.backends.qemu import QemuMachine
from pytest_kvm.errors import GuestLaunchError
from tests.support.processes import child_exit_code
from tests.support.specs import small_spec as spec


def fake_qemu(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "fake-qemu"
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def test_qemu_that_exits_reports_argv_exit_code_and_its_message(tmp_path):
    binary = fake_qemu(
        tmp_path,
        'echo "qemu-system-x86_64: Could not set up host forwarding rule '
        "'tcp:127.0.0.1:40022-:22'\" >&2; exit 1",
    )
    s = spec(tmp_path)
    machine = QemuMachine(s, binary=str(binary))
    with pytest.raises(GuestLaunchError) as info:
        machine.start(connect_timeout=10)
    err = info.value
    assert err.exit_code == 1
    assert err.argv[0] == str(binary)
    assert "QEMU failed to start (exit 1)" in str(err)
    assert "host forwarding rule" in str(err)
    # Cleaned up before raising: no sockets left, close is idempotent.
    assert not s.qmp_socket.exists()
    machine.close()
    assert not machine.is_running()


def test_qemu_that_never_connects_is_killed_after_the_timeout(tmp_path):
    binary = fake_qemu(tmp_path, "exec sleep 60")
    machine = QemuMachine(spec(tmp_path), binary=str(binary))
    with pytest.raises(GuestLaunchError, match="did not connect to QMP"):
        machine.start(connect_timeout=0.5)
    assert not machine.is_running()
    assert machine.exit_code() is not None


def test_on_spawn_names_the_running_qemu_before_start_waits_for_it(tmp_path):
    """What a guest's lease needs at once (a kept guest's QEMU has no parent-death
    signal): the PID of a QEMU that runs, before start() returns or fails."""
    binary = fake_qemu(tmp_path, "exec sleep 60")
    seen: list[tuple[int, bool]] = []
    machine = QemuMachine(
        spec(tmp_path),
        binary=str(binary),
        on_spawn=lambda pid: seen.append((pid, Path(f"/proc/{pid}").exists())),
    )
    with pytest.raises(GuestLaunchError, match="did not connect to QMP"):
        machine.start(connect_timeout=0.5)
    assert len(seen) == 1 and seen[0][1], "on_spawn was not called with a live QEMU"


def test_a_child_made_by_fork_starts_qemu_in_bounded_time(tmp_path):
    # Every QEMU is forked by one spawner thread; a child made by os.fork has none of
    # its parent's threads, so it needs a spawner of its own. Here the whole start
    # path runs in the child with a fake QEMU that exits 1: GuestLaunchError with that
    # exit code means the child's spawner started it.
    binary = fake_qemu(tmp_path, "exit 1")
    with pytest.raises(GuestLaunchError):  # the parent's spawner thread is up
        QemuMachine(spec(tmp_path), binary=str(binary)).start(connect_timeout=10)
    child_dir = tmp_path / "child"
    child_dir.mkdir()
    pid = os.fork()
    if pid == 0:  # the child: report by exit code only, never return into pytest
        code = 3
        try:
            QemuMachine(spec(child_dir), binary=str(binary)).start(connect_timeout=10)
        except GuestLaunchError as exc:
            code = 0 if exc.exit_code == 1 else 4
        except BaseException:
            code = 5
        os._exit(code)
    code = child_exit_code(pid, 20)
    assert code is not None, "starting a guest in a forked child hung (no spawner thread)"
    assert code == 0
