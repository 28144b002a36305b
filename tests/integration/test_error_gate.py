"""The error gate (--kvm-fail-on, kvm_allow) on real guests, as a user meets it: an inner
run whose tests pass their own assertions but whose guests crash a daemon, load a kernel
module that warns, log an error or panic; the gate fails those tests with the guest's
lines as evidence, and passes what the test excused, what the test was already told
about and a guest that logged nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

INNER = r"""
import time

import pytest

from pytest_kvm.errors import GuestCrashed


def wait_until_failed(guest, unit):
    guest.wait_until_succeeds(f"systemctl is-failed -q {unit}", timeout=60)


def log_err(guest, priority, text):
    # The test's first command, and nothing waits for journald to write it: the gate
    # must find it all the same (a restored clone's journald has just restarted).
    guest.succeed(f"logger -p daemon.{priority} -t gatetest '{text}'")


@pytest.mark.kvm(fail_on="coredump")
def test_segfaulting_daemon(kvm_guest):
    # A real fault (a NULL read), so the kernel logs "segfault at" too.
    kvm_guest.succeed(
        "systemd-run --unit=crashy python3 -c 'import ctypes; ctypes.string_at(0)'"
    )
    wait_until_failed(kvm_guest, "crashy")


@pytest.mark.kvm(fail_on="coredump")
def test_daemon_killed_by_sigsegv(kvm_guest):
    # No compiled code: the shell sends itself SIGSEGV ($$$$ is $$ after systemd's expansion).
    kvm_guest.succeed("systemd-run --unit=killed sh -c 'kill -SEGV $$$$'")
    wait_until_failed(kvm_guest, "killed")


@pytest.mark.kvm(fail_on="journal-err")
def test_logged_error(kvm_guest):
    log_err(kvm_guest, "err", "disk on fire (gate test)")


@pytest.mark.kvm(fail_on="journal-err,coredump")
@pytest.mark.kvm_allow(r"expected trouble \(gate test\)")
def test_allowed_error(kvm_guest):
    log_err(kvm_guest, "err", "expected trouble (gate test)")


@pytest.mark.kvm(fail_on="oops")
def test_module_that_warns(kvm_guest, tmp_path):
    from warning_module import build_warning_module  # copied in by the outer test

    module = build_warning_module(kvm_guest.succeed("uname -r").strip(), tmp_path)
    kvm_guest.put(module, "/tmp/pkvm_warns.ko")
    kvm_guest.succeed("insmod /tmp/pkvm_warns.ko")  # loads fine: only the WARN tells


@pytest.mark.kvm(fail_on="panic,oops,coredump,journal-err")
def test_quiet_guest(kvm_guest):
    # A line written to /dev/kmsg by a process is not the kernel's own (facility user).
    kvm_guest.succeed("echo '<4>WARNING: CPU: 0 PID: 1 at fake.c:1 fake' > /dev/kmsg")
    kvm_guest.succeed("echo quiet")


def test_unseen_panic(kvm_guest):
    kvm_guest.succeed(
        "setsid sh -c 'sleep 1; echo c > /proc/sysrq-trigger' </dev/null >/dev/null 2>&1 &"
    )
    deadline = time.monotonic() + 120
    while b"Kernel panic" not in kvm_guest.serial_log.read_bytes():
        assert time.monotonic() < deadline, "no panic on the console"
        time.sleep(0.5)


def test_panic_the_test_was_told_of(kvm_guest):
    with pytest.raises(GuestCrashed):
        kvm_guest.run("echo c > /proc/sysrq-trigger", timeout=60)


@pytest.mark.kvm(fail_on="journal-err")
def test_failing_test_with_errors(kvm_guest):
    log_err(kvm_guest, "crit", "also broken (gate test)")
    assert False, "the test's own failure"
"""


@pytest.fixture
def inner_result(pytester, image_arg, cache_arg, inner_env):
    pytester.makepyfile(test_inner=INNER)
    pytester.copy_example(str(Path(__file__).parent / "support" / "warning_module.py"))
    return pytester.runpytest_subprocess(
        f"--kvm-image={image_arg}", cache_arg, f"--kvm-artifacts={pytester.path / 'arts'}",
        "-p", "no:cacheprovider", "-rA",
    )  # fmt: skip


def _failure(out: str, test: str) -> str:
    """The FAILURES section of one inner test."""
    head = f"_ {test}["
    assert head in out, out[-3000:]
    return out.split(head, 1)[1].split("\n____", 1)[0].split("\n====", 1)[0]


def test_the_gate_fails_tests_whose_guests_logged_errors(inner_result, inner_env):
    out = inner_result.stdout.str()
    inner_result.assert_outcomes(failed=6, passed=3)

    segv = _failure(out, "test_segfaulting_daemon")
    assert "logged errors during the test (--kvm-fail-on coredump)" in segv
    assert "segfault at 0 ip" in segv  # the kernel's line
    # code=killed: no core was written (the image has no systemd-coredump)
    assert "crashy.service: Main process exited, code=killed, status=11/SEGV" in segv

    killed = _failure(out, "test_daemon_killed_by_sigsegv")
    assert "killed.service: Main process exited, code=killed, status=11/SEGV" in killed
    assert "segfault at" not in killed  # a signal, not a fault: systemd's lines only

    warned = _failure(out, "test_module_that_warns")
    assert "logged errors during the test (--kvm-fail-on oops)" in warned
    assert "oops: kernel: WARNING: CPU: " in warned and "pkvm_warns_init" in warned

    err = _failure(out, "test_logged_error")
    assert "journal-err: gatetest" in err and "disk on fire (gate test)" in err
    assert "kvm_allow" in err  # says how to excuse it

    panic = _failure(out, "test_unseen_panic")
    assert "(--kvm-fail-on panic)" in panic
    assert "Kernel panic - not syncing: sysrq triggered crash" in panic

    own = _failure(out, "test_failing_test_with_errors")
    assert "the test's own failure" in own  # the test's error stays the failure
    assert "kvm error gate: kvm-" in own and "also broken (gate test)" in own

    for passed in ("test_allowed_error", "test_quiet_guest", "test_panic_the_test_was_told_of"):
        assert f"PASSED test_inner.py::{passed}" in out
    assert list(inner_env.iterdir()) == []
