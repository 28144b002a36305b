"""``--kvm-pause-on-failure``: when a test's call fails, before its teardown, print how
to reach each of its guests (SSH line, console socket, VNC) and wait for Enter while
they keep running.

It runs in ``pytest_exception_interact``, the hook pytest's own ``--pdb`` uses: after
the failure's report (so keep-on-failure and the artifacts are done) and before the
fixtures' teardown. Capture is suspended as pdb does (``capman.suspend(in_=True)``),
so it works with and without ``-s``. With ``--pdb`` the debugger session is the pause:
the lines are printed first (``tryfirst``) and nothing more is waited for; the guests
stay up until the debugger continues, because teardown comes after this hook.

xdist workers have no terminal: the option is refused at startup there."""

from __future__ import annotations

import contextlib
import os
import shlex
import stat
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytest

from .config import OPTIONS, Settings
from .errors import KvmConfigError
from .guest import Guest
from .session import guests_key, settings_key

OPTION = OPTIONS["pause_on_failure"]
FAILURE_LINES = 15  # the end of the failure's traceback, shown above the guests
PROMPT = "pytest-kvm: paused: press Enter to tear the guests down and go on"


def option_source(config: pytest.Config, environ: Mapping[str, str]) -> str:
    """Where the setting came from, for the refusal: as ``config.resolve`` decides it."""
    if config.getoption("kvm_pause_on_failure") is not None:
        return f"command line {OPTION.flag}"
    if environ.get(OPTION.env):
        return f"environment {OPTION.env}"
    return f"ini {OPTION.ini}"


def check(config: pytest.Config, settings: Settings) -> None:
    """Refuse the option where no one can press Enter: xdist (workers, or a controller
    that will start them)."""
    if not settings.pause_on_failure:
        return
    worker = hasattr(config, "workerinput")
    dist = getattr(config.option, "dist", "no")
    distributing = dist != "no" and bool(
        getattr(config.option, "numprocesses", None) or getattr(config.option, "tx", None)
    )
    if worker or distributing:
        raise KvmConfigError(
            f"{option_source(config, os.environ)}: {OPTION.flag} needs a terminal to wait "
            "on, and xdist workers have none; run without -n (or use --kvm-keep-on-failure)"
        )


def reach_lines(guest: Guest) -> list[str]:
    """How a person reaches a running guest: SSH, console, display, serial log."""
    machine = guest.machine
    if machine is None or not guest.is_running:
        return [f"{guest.describe()}: not running"]
    lines = [f"{guest.describe()}: running"]
    if guest.config.ssh:
        lines.append(f"  ssh:        {guest.ssh_command}")
    console = shlex.quote(str(machine.spec.console_socket))
    if guest.backend == "libvirt":
        # The domain's console stream is ours; its socket takes input only, and the
        # output goes on into the serial log.
        log = shlex.quote(str(guest.serial_log))
        lines.append(
            f"  console:    socat - UNIX-CONNECT:{console}   (input; output: tail -f {log})"
        )
    else:
        lines.append(f"  console:    socat -,raw,echo=0 UNIX-CONNECT:{console}")
    if guest.has_display:
        if guest.vnc is not None:
            host, port = guest.vnc
            lines.append(f"  vnc:        {host}:{port} (display :{port - 5900}), "
                         f"password in {guest.vnc_password_file}")  # fmt: skip
        else:
            lines.append("  vnc:        none (--kvm-vnc adds one); guest.screenshot() works")
    lines.append(f"  serial log: {guest.serial_log}")
    return lines


def release_console(guest: Guest) -> None:
    """Let go of the console socket if a test typed into it (``console.send`` keeps a
    connection, and QEMU serves one client at a time); the next send connects again."""
    with contextlib.suppress(AttributeError, OSError):
        guest.console.close()


def stdin_waitable() -> bool:
    """Whether a line can be waited for on standard input: a terminal or a pipe (how
    a script drives the pause). /dev/null or a file would end the wait at once."""
    try:
        fd = sys.stdin.fileno()
        return os.isatty(fd) or stat.S_ISFIFO(os.fstat(fd).st_mode)
    except (AttributeError, OSError, ValueError):
        return False


class Pause:
    """The hook; ``read_line`` is how Enter is waited for (a test may pass its own)."""

    def __init__(self, read_line: Callable[[], str] | None = None) -> None:
        # sys.stdin is looked up when the pause comes: capture replaces it until then.
        self._read_line = read_line or (lambda: sys.stdin.readline())

    @pytest.hookimpl(tryfirst=True)
    def pytest_exception_interact(
        self, node: pytest.Item | pytest.Collector, call: pytest.CallInfo[Any], report: Any
    ) -> None:
        settings = node.config.stash.get(settings_key, None)
        if settings is None or not settings.pause_on_failure:
            return
        if report.when != "call" or not report.failed or not isinstance(node, pytest.Item):
            return
        guests: list[Guest] = node.stash.get(guests_key, [])
        if not guests:
            return
        capman = node.config.pluginmanager.getplugin("capturemanager")
        if capman is not None:
            capman.suspend(in_=True)
        try:
            self._pause(node, guests, report)
        finally:
            if capman is not None:
                capman.resume()

    def _pause(self, item: pytest.Item, guests: Sequence[Guest], report: Any) -> None:
        out = sys.stdout
        pdb = bool(item.config.getvalue("usepdb"))
        failure = "\n".join(str(report.longreprtext).splitlines()[-FAILURE_LINES:])
        out.write(f"\n{failure}\n")
        out.write(f"pytest-kvm: {item.nodeid} failed; its guests are still running:\n")
        for guest in guests:
            release_console(guest)
            out.write("".join(line + "\n" for line in reach_lines(guest)))
        if pdb:
            out.write("pytest-kvm: --pdb: the guests stay up until the debugger continues\n")
            out.flush()
            return
        if not stdin_waitable():
            out.write("pytest-kvm: not paused: standard input is neither a terminal nor a pipe\n")
            out.flush()
            return
        out.write(PROMPT + "\n")
        out.flush()
        try:
            line = self._read_line()
        except (OSError, ValueError, EOFError):
            line = ""
        if not line:
            out.write("pytest-kvm: standard input closed: going on\n")
            out.flush()
