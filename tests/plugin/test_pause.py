"""--kvm-pause-on-failure in pytester sandboxes: the wait for Enter on a pipe (with
capture on and with -s), nothing for passing tests, the xdist refusal. A stand-in
guest (duck-typed: what ``pause.reach_lines`` reads) is put where the factory puts
its guests; the real-guest test is tests/integration/test_pause.py."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_kvm.pause import PROMPT
from tests.support.runs import assert_usage_error

CONFTEST = """
import types
from pathlib import Path

import pytest

from pytest_kvm.session import guests_key


class StandIn:
    def __init__(self, tmp):
        self.machine = types.SimpleNamespace(spec=types.SimpleNamespace(
            console_socket=Path(tmp) / "console sock"))
        self.is_running = True
        self.backend = "qemu"
        self.config = types.SimpleNamespace(ssh=True)
        self.ssh_command = "ssh -p 2222 root@127.0.0.1"
        self.has_display = True
        self.vnc = ("127.0.0.1", 5901)
        self.vnc_password_file = Path(tmp) / "vnc-password"
        self.serial_log = Path(tmp) / "serial.log"
        # What the report hooks read of a guest: nothing to add, no artifacts.
        self.name = "stand-in"
        self.image = types.SimpleNamespace(name="debian-12")
        self.boot_timings = {}
        self.workdir = None

    def resource_usage(self):
        return ""

    def describe(self):
        return "guest 'stand-in' (debian-12)"


@pytest.fixture
def fake_guest(request, tmp_path):
    guest = StandIn(tmp_path)
    request.node.stash[guests_key] = [guest]
    return guest
"""

TESTS = """
import os

def test_passes(fake_guest):
    pass

def test_fails(fake_guest):
    print("captured output of the test")
    assert False, "the failure shown above the guests"

def test_after(fake_guest):
    open(os.environ["AFTER_MARK"], "w").close()
"""


def _start(pytester: pytest.Pytester, *args: str) -> tuple[subprocess.Popen[str], Path]:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_it=TESTS)
    mark = pytester.path / "after-ran"
    env = {**os.environ, "AFTER_MARK": str(mark)}
    env = {k: v for k, v in env.items() if not k.startswith("PYTEST_KVM_") or "RUNTIME" in k}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args],
        cwd=pytester.path,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    return proc, mark


def _read_until(proc: subprocess.Popen[str], needle: str) -> str:
    assert proc.stdout is not None
    seen = ""
    while needle not in seen:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"the run ended before {needle!r}:\n{seen}")
        seen += line
    return seen


@pytest.mark.parametrize("capture", [(), ("-s",)], ids=["captured", "-s"])
def test_a_failed_call_waits_for_enter_before_going_on(pytester: pytest.Pytester, capture):
    proc, mark = _start(pytester, "--kvm-pause-on-failure", *capture)
    try:
        shown = _read_until(proc, PROMPT)
        assert "the failure shown above the guests" in shown
        assert "test_it.py::test_fails failed; its guests are still running" in shown
        assert "ssh:        ssh -p 2222 root@127.0.0.1" in shown
        assert "console:    socat -,raw,echo=0 UNIX-CONNECT:'" in shown  # quoted: a space
        assert "vnc:        127.0.0.1:5901 (display :1), password in " in shown
        assert "test_passes" not in shown
        # It waits: the next test has not run while nobody pressed Enter.
        time.sleep(1)
        assert proc.poll() is None and not mark.exists()
        assert proc.stdin is not None
        proc.stdin.write("\n")
        proc.stdin.flush()
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, out
    assert mark.exists()
    assert "1 failed, 2 passed" in out


def test_without_the_option_nothing_waits(pytester: pytest.Pytester):
    proc, mark = _start(pytester)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1 and mark.exists(), out
    assert PROMPT not in out


def test_closed_stdin_goes_on(pytester: pytest.Pytester):
    proc, mark = _start(pytester, "--kvm-pause-on-failure")
    out, _ = proc.communicate("", timeout=60)  # EOF at once
    assert "standard input closed: going on" in out
    assert proc.returncode == 1 and mark.exists(), out


@pytest.mark.parametrize(
    ("args", "env", "source"),
    [
        (("-n", "2", "--kvm-pause-on-failure"), {}, "command line --kvm-pause-on-failure"),
        (("-n", "2"), {"PYTEST_KVM_PAUSE_ON_FAILURE": "1"}, "environment PYTEST_KVM_PAUSE_"),
    ],
    ids=["cli", "env"],
)
def test_xdist_is_refused_in_one_line(pytester: pytest.Pytester, monkeypatch, args, env, source):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = pytester.runpytest(*args)
    assert_usage_error(
        result, f"pytest-kvm: {source}", "needs a terminal to wait on, and xdist workers"
    )
    ours = [line for line in result.stderr.str().splitlines() if "pytest-kvm" in line]
    assert len(ours) == 1, result.stderr.str()


def test_ini_is_refused_under_xdist_too(pytester: pytest.Pytester):
    pytester.makeini("[pytest]\nkvm_pause_on_failure = true\n")
    pytester.makepyfile("def test_nothing():\n    pass\n")
    result = pytester.runpytest("-n", "2")
    assert_usage_error(result, "pytest-kvm: ini kvm_pause_on_failure: --kvm-pause-on-failure")


def test_the_option_is_in_help(pytester: pytest.Pytester):
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(["*--kvm-pause-on-failure*"])
