"""Nothing leaks, whatever happens to a run: normal end, failure, Ctrl-C, SIGTERM,
SIGKILL of pytest or of one xdist worker, and guests kept on failure.

Each test runs an inner pytest with real guests in its own runtime dir and, after it,
counts what that run left: QEMU processes, dirs (overlays, keys, sockets), leases.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_kvm.reaper import Lease, lease_dir, leases, process_alive
from tests.integration.support.inner import NOTHING, leftovers, short
from tests.integration.support.inner import InnerRuns as _Inner
from tests.integration.support.inner import leases_under as _leases_under
from tests.integration.support.inner import qemu_of as _qemu_of
from tests.integration.support.inner import run_ids as _run_ids


def _wait_for(what: str, check, proc: subprocess.Popen[bytes] | None, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the inner run ended ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _guest_leases_running(runtime: Path, count: int = 1) -> list[Lease]:
    found = [
        lease
        for lease in _leases_under(runtime)
        if lease.kind == "guest" and lease.data.get("qemu_pid")
    ]
    return found if len(found) >= count else []


@pytest.fixture
def inner(pytester, inner_env, image_arg, cache_arg) -> Iterator[_Inner]:
    runs = _Inner(pytester, inner_env, [f"--kvm-image={image_arg}", cache_arg])
    try:
        yield runs
    finally:
        runs.stop()


HOLD = """
import os, time, pytest

def _hold(guest, name):
    guest.succeed("echo up > /root/up")
    open(name + ".running", "w").close()
    deadline = time.monotonic() + 300
    while not os.path.exists("go") and time.monotonic() < deadline:
        time.sleep(0.1)
"""


def test_normal_end_and_failing_test_leave_nothing(inner, pytester):
    pytester.makepyfile(
        test_it="""
        def test_pass(kvm_guest):
            kvm_guest.succeed("true")

        def test_fail(kvm_guest):
            kvm_guest.succeed("echo broken > /root/state")
            assert kvm_guest.succeed("cat /root/state").strip() == "fine"
        """
    )
    proc = inner.start("--kvm-artifacts", str(pytester.path / "artifacts"))
    code = inner.wait(proc)
    text = inner.output(proc)
    assert code == 1, text[-3000:]
    assert re.search(r"1 failed, 1 passed", text), text[-3000:]
    assert leftovers(inner.runtime, _run_ids(inner.runtime, text)) == NOTHING


def test_ctrl_c_during_boot_tears_down(inner, pytester):
    pytester.makepyfile(
        test_it="""
        import pytest

        @pytest.mark.kvm(snapshot=False)
        def test_boot(kvm_guest):
            kvm_guest.succeed("true")
        """
    )
    proc = inner.start()
    # A real boot: QEMU is up, the guest is on its way to SSH.
    found = _wait_for("a booting guest", lambda: _guest_leases_running(inner.runtime), proc)
    run_ids = {str(found[0].data["run_id"])}
    time.sleep(2)
    os.kill(proc.pid, signal.SIGINT)
    code = inner.wait(proc)
    text = inner.output(proc)
    assert code == 2, text[-3000:]  # pytest: interrupted
    assert "KeyboardInterrupt" in text
    assert leftovers(inner.runtime, run_ids) == NOTHING


def test_sigterm_during_a_test_tears_down(inner, pytester):
    pytester.makepyfile(test_it=HOLD + "\ndef test_hold(kvm_guest):\n    _hold(kvm_guest, 'a')\n")
    proc = inner.start()
    _wait_for("the test to hold its guest", lambda: (pytester.path / "a.running").exists(), proc)
    run_ids = _run_ids(inner.runtime)
    qemu = [pid for run_id in run_ids for pid in _qemu_of(run_id)]
    assert qemu, "no QEMU seen for the held guest"
    os.kill(proc.pid, signal.SIGTERM)
    code = inner.wait(proc)
    text = inner.output(proc)
    assert code == 2, text[-3000:]
    assert "SIGTERM" in text
    assert leftovers(inner.runtime, run_ids) == NOTHING


def test_sigkill_of_pytest_is_reaped_and_live_runs_are_spared(inner, pytester):
    """SIGKILL one run: its QEMU dies with it; `pytest-kvm reap` removes what it
    left, and leaves a second run that is still alive alone."""
    dirs = {}
    for label in ("a", "b"):
        dirs[label] = pytester.path / label
        dirs[label].mkdir()
        (dirs[label] / "test_it.py").write_text(
            HOLD + f"\ndef test_hold(kvm_guest):\n    _hold(kvm_guest, {label!r})\n"
        )
    a = inner.start(cwd=dirs["a"])
    b = inner.start(cwd=dirs["b"])
    for label, proc in (("a", a), ("b", b)):
        _wait_for(
            f"run {label} to hold its guest",
            lambda label=label: (dirs[label] / f"{label}.running").exists(),
            proc,
        )
    by_pid = {lease.data["pid"]: lease for lease in _guest_leases_running(inner.runtime, 2)}
    lease_a, lease_b = by_pid[a.pid], by_pid[b.pid]
    run_a, run_b = str(lease_a.data["run_id"]), str(lease_b.data["run_id"])
    os.kill(a.pid, signal.SIGKILL)
    a.wait()
    # QEMU dies with its parent (parent-death signal) ...
    _wait_for("run a's QEMU to die", lambda: not _qemu_of(run_a), None, timeout=15)
    # ... and its files stay until somebody reaps.
    assert Path(lease_a.data["workdir"]).exists()
    assert lease_a.path.exists()
    reaped = subprocess.run(
        [sys.executable, "-m", "pytest_kvm.cli", "reap"], capture_output=True, text=True
    )
    assert reaped.returncode == 0, reaped.stderr
    assert lease_a.data["name"] in reaped.stdout
    left = leftovers(inner.runtime, {run_a})
    left["dirs"] = [d for d in left["dirs"] if short(run_b) not in d]
    assert left == NOTHING
    # Run b is untouched: its guest still runs and its test passes.
    assert process_alive(lease_b.data["qemu_pid"], lease_b.data["qemu_start"])
    assert lease_b.data["name"] not in reaped.stdout
    (dirs["b"] / "go").touch()
    assert inner.wait(b) == 0, inner.output(b)[-3000:]
    assert leftovers(inner.runtime, {run_a, run_b}) == NOTHING


def test_sigkill_of_one_xdist_worker(inner, pytester):
    """Under -n 2, SIGKILL the worker holding one guest: xdist reports the crash, the
    other worker's test passes, and the controller reaps what the dead worker left."""
    pytester.makepyfile(
        test_it=HOLD
        + "\ndef test_one(kvm_guest):\n    _hold(kvm_guest, 'one')\n"
        + "\ndef test_two(kvm_guest):\n    _hold(kvm_guest, 'two')\n"
    )
    proc = inner.start("-n", "2")
    for label in ("one", "two"):
        _wait_for(
            f"test {label} to hold its guest",
            lambda label=label: (pytester.path / f"{label}.running").exists(),
            proc,
        )
    held = _guest_leases_running(inner.runtime, 2)
    victim = held[0]
    run_ids = {str(lease.data["run_id"]) for lease in held}
    os.kill(victim.data["pid"], signal.SIGKILL)
    _wait_for(
        "the killed worker's QEMU to die",
        lambda: not process_alive(victim.data["qemu_pid"], victim.data["qemu_start"]),
        None,
        timeout=15,
    )
    (pytester.path / "go").touch()
    code = inner.wait(proc)
    text = inner.output(proc)
    assert code == 1, text[-3000:]
    assert "crashed" in text
    assert "1 passed" in text
    assert leftovers(inner.runtime, run_ids | _run_ids(inner.runtime, text)) == NOTHING


def test_keep_on_failure_keeps_the_guest_until_reaped(inner, pytester):
    pytester.makepyfile(
        test_it="""
        def test_fail(kvm_guest):
            kvm_guest.succeed("echo 'left for you' > /root/note")
            assert False, "look at the guest"
        """
    )
    proc = inner.start("--kvm-keep-on-failure")
    code = inner.wait(proc)
    text = inner.output(proc)
    assert code == 1, text[-3000:]
    assert "guests kept (--kvm-keep-on-failure)" in text
    match = re.search(r"^\s+ssh:\s+(ssh .*)$", text, re.MULTILINE)
    assert match, text[-3000:]
    assert "pytest-kvm reap" in text
    kept = [lease for lease in _leases_under(inner.runtime) if lease.kind == "guest"]
    assert len(kept) == 1 and kept[0].kept
    qemu_pid, qemu_start = kept[0].data["qemu_pid"], kept[0].data["qemu_start"]
    assert process_alive(qemu_pid, qemu_start), "the kept guest is not running"
    # The printed command reaches the guest after the run ended.
    ssh = subprocess.run(
        [*shlex.split(match.group(1)), "-o", "BatchMode=yes", "cat /root/note"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ssh.stdout.strip() == "left for you", ssh.stderr
    # Automatic reaping (a later run) leaves kept guests alone; `reap` ends them.
    left_alone = subprocess.run(
        [sys.executable, "-m", "pytest_kvm.cli", "reap", "--leave-kept"],
        capture_output=True,
        text=True,
    )
    assert "left running (kept)" in left_alone.stdout
    assert process_alive(qemu_pid, qemu_start)
    reaped = subprocess.run(
        [sys.executable, "-m", "pytest_kvm.cli", "reap"], capture_output=True, text=True
    )
    assert f"killed QEMU {qemu_pid}" in reaped.stdout, reaped.stdout
    assert not process_alive(qemu_pid, qemu_start)
    assert leftovers(inner.runtime, _run_ids(inner.runtime, text)) == NOTHING


def test_lease_dir_is_private():
    path = lease_dir()
    assert path.stat().st_mode & 0o777 == 0o700
    for lease in leases(path):
        assert lease.path.stat().st_mode & 0o777 == 0o600


def test_the_lease_names_qemu_before_start_returns(kvm_guest_factory, monkeypatch):
    """A SIGKILL of pytest while a guest starts leaves nothing unreapable: the guest's
    lease names its QEMU from the moment it is spawned, before start() waits for QMP
    and the guest (a kept guest's QEMU has no parent-death signal and outlives us)."""
    from pytest_kvm.backends import qemu as backend

    at_spawn: dict[str, object] = {}
    real_accept = backend._Qmp.accept

    def accept(self, timeout, alive):  # QEMU runs; start() now waits for its QMP
        for lease in leases():
            if lease.kind == "guest" and lease.data.get("pid") == os.getpid():
                at_spawn[str(lease.data["name"])] = lease.data.get("qemu_pid")
        return real_accept(self, timeout, alive)

    monkeypatch.setattr(backend._Qmp, "accept", accept)
    guest = kvm_guest_factory()
    assert guest.name in at_spawn, "no lease of the guest while QEMU started"
    assert at_spawn[guest.name] == guest.machine.pid
