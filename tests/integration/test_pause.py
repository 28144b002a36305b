"""--kvm-pause-on-failure with a real guest: an inner run whose test fails pauses before
teardown; meanwhile the printed SSH line reaches the still-running guest; Enter ends
the pause, the failure is reported and no QEMU is left. With --pdb the debugger
session is the pause (the guest is up at its prompt)."""

from __future__ import annotations

import os
import re
import select
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_kvm.pause import PROMPT
from tests.integration.support.inner import INNER_TIMEOUT, NOTHING, leftovers, run_ids

FAILING = """
def test_fails(kvm_guest):
    kvm_guest.succeed("echo 'left for you' > /root/note")
    assert False, "look at the guest"
"""


@pytest.fixture
def inner(pytester, inner_env, image_arg, cache_arg) -> Iterator[list[subprocess.Popen[str]]]:
    pytester.makepyfile(test_it=FAILING)
    procs: list[subprocess.Popen[str]] = []
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _start(pytester, procs, image_arg, cache_arg, *args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
         f"--kvm-image={image_arg}", cache_arg, *args],
        cwd=pytester.path,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ),
    )  # fmt: skip
    procs.append(proc)
    return proc


def _read_until(proc: subprocess.Popen[str], needle: str) -> str:
    """Output up to ``needle``, unbuffered: pdb's prompt ends without a newline."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    seen = b""
    deadline = time.monotonic() + INNER_TIMEOUT
    while needle.encode() not in seen:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(fd, 4096) if ready else b""
        if not chunk:
            raise AssertionError(f"no {needle!r} from the inner run:\n{seen[-3000:]!r}")
        seen += chunk
    return seen.decode(errors="replace")


def _ssh(shown: str, command: str) -> subprocess.CompletedProcess[str]:
    match = re.search(r"^\s+ssh:\s+(ssh .*)$", shown, re.MULTILINE)
    assert match, shown[-3000:]
    return subprocess.run(
        [*shlex.split(match.group(1)), "-o", "BatchMode=yes", command],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _console_answer(path: Path, data: bytes) -> str:
    """What the console says within a while after ``data`` is typed into it."""
    received = b""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))
        sock.sendall(data)
        deadline = time.monotonic() + 60
        while b"login:" not in received and time.monotonic() < deadline:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                chunk = sock.recv(4096)
            except TimeoutError:
                break
            if not chunk:
                break
            received += chunk
    return received.decode(errors="replace")


def _finish(proc: subprocess.Popen[str], answer: str, seen: str, runtime: Path) -> str:
    assert proc.stdin is not None
    proc.stdin.write(answer)
    proc.stdin.flush()
    out, _ = proc.communicate(timeout=INNER_TIMEOUT)
    text = seen + out
    assert proc.returncode == 1, text[-3000:]
    assert "1 failed" in text and "look at the guest" in text
    assert leftovers(runtime, run_ids(runtime, text)) == NOTHING
    return text


def test_a_failed_test_pauses_with_its_guest_running(
    inner, pytester, inner_env, image_arg, cache_arg
):
    proc = _start(pytester, inner, image_arg, cache_arg, "-s", "--kvm-pause-on-failure")
    shown = _read_until(proc, PROMPT)
    # The printed console socket answers: the serial getty prompts again on Enter.
    match = re.search(r"console:    socat -,raw,echo=0 UNIX-CONNECT:(\S+)", shown)
    assert match, shown[-3000:]
    assert "login:" in _console_answer(Path(shlex.split(match.group(1))[0]), b"\r")
    # The guest runs while the test waits: the printed line reaches it.
    ssh = _ssh(shown, "cat /root/note")
    assert ssh.stdout.strip() == "left for you", ssh.stderr
    assert proc.poll() is None
    _finish(proc, "\n", shown, inner_env)


def test_with_pdb_the_guest_is_up_in_the_debugger(inner, pytester, inner_env, image_arg, cache_arg):
    proc = _start(pytester, inner, image_arg, cache_arg, "--pdb", "--kvm-pause-on-failure")
    shown = _read_until(proc, "the guests stay up until the debugger continues")
    shown += _read_until(proc, "(Pdb)")
    ssh = _ssh(shown, "cat /root/note")
    assert ssh.stdout.strip() == "left for you", ssh.stderr
    # The debugger has the test's frame: the guest object answers there too.
    assert proc.stdin is not None
    proc.stdin.write("p kvm_guest.succeed('cat /root/note')\n")
    proc.stdin.flush()
    shown += _read_until(proc, "left for you")
    _finish(proc, "c\n", shown, inner_env)
