"""What a run tells about its guests: failure artifacts, console tails and boot timings
(``-v``); the progress lines of a long wait are in progress.py.

A failed test's guests each leave ``--kvm-artifacts DIR/<test id>/<guest>/``:

- ``serial.log``         the whole console since power-on
- ``qemu-argv.txt``      the QEMU command line (libvirt: the domain XML)
- ``qmp-events.txt``     QMP events, one JSON object a line, with QEMU's timestamp
                         (or ``qmp-events-none.txt`` saying why there are none)
- ``boot-timings.txt``   seconds per boot phase
- ``screen.png``         the display (``screen.txt`` too while it is in a text mode),
                         or ``screen-error.txt`` saying why there is none
- ``screen-recording.png`` with ``--kvm-record`` (recording.py): an animated PNG of
                         the screen, ``screen-recording.txt`` its frames' times
- ``journal.txt``        the journal of the current boot, ``journal-source.txt``
                         where it came from; a guest without systemd (sysvinit) has
                         no journal: ``dmesg.txt`` holds its kernel log instead.
                         A guest that does not answer SSH within 10 s (its network
                         gone) has its journal read from its disk at once

With pytest-html active, the screenshot and the console tail go into the HTML report
as extras.
"""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .backends.base import Machine
from .display import PNG_MAGIC, ppm_to_png
from .errors import KvmError

if TYPE_CHECKING:
    from .guest import Guest

CONSOLE_TAIL_LINES = 30
TIMINGS_SECTION = "kvm boot timings: "
# How long a failed test's guest has to run ``true`` over SSH before its journal is
# read from its disk instead (seconds, not scaled: a live guest answers in one).
SSH_LOOK = 10.0
_SCREEN = "screen.png"


def folder_for(root: Path, nodeid: str, guest_name: str) -> Path:
    """``root/<test id, made a safe file name>/<guest>``."""
    safe = "".join(c if c.isalnum() or c in "-_.[]" else "_" for c in nodeid)[-150:]
    return root / safe / guest_name


def format_timings(timings: Mapping[str, float]) -> str:
    """``overlay 0.01 s, restore 0.09 s, ssh_ready 0.97 s, total 1.07 s``."""
    return ", ".join(f"{phase} {seconds:.2f} s" for phase, seconds in timings.items())


def timings_section(guest_name: str, timings: Mapping[str, float]) -> tuple[str, str]:
    """A report section: ``("kvm boot timings: NAME", "overlay 0.01 s, ...")``."""
    return f"{TIMINGS_SECTION}{guest_name}", format_timings(timings)


class BootTimingsReporter:
    """With -v: each guest's boot phases on a line under the test's result. Read from
    the report's sections, so the reports of xdist workers show them too."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        lines = [
            f"    {title}: {text}"
            for title, text in report.sections
            if title.startswith(TIMINGS_SECTION)
        ]
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if not lines or reporter is None:
            return
        reporter.ensure_newline()
        for line in lines:
            reporter.write_line(line)


def format_events(events: Iterable[Mapping[str, Any]]) -> str:
    """QMP events as JSON lines: ``{"timestamp": {...}, "event": ..., "data": ...}``,
    the timestamp (QEMU's, seconds and microseconds since the epoch) first."""
    lines = []
    for event in events:
        ordered = {"timestamp": event.get("timestamp"), "event": event.get("event")}
        ordered.update((k, v) for k, v in event.items() if k not in ordered)
        lines.append(json.dumps(ordered, sort_keys=False, default=str))
    return "".join(line + "\n" for line in lines)


def save(guest: Guest, root: Path, nodeid: str, keep_running: bool = False) -> Path:
    """Write ``guest``'s artifacts for the failed test ``nodeid``; returns the folder.

    Each part is written on its own: one that cannot be had leaves a note saying why,
    and does not stop the others. ``keep_running`` (--kvm-keep-on-failure): the guest
    is not stopped to read its journal from its disk."""
    folder = folder_for(root, nodeid, guest.name)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(guest.serial_log, folder / "serial.log")
    machine = guest.machine
    if machine is not None:
        (folder / "qemu-argv.txt").write_text("\n".join(machine.argv) + "\n")
        _save_events(machine, folder)
    (folder / "boot-timings.txt").write_text(
        "".join(f"{k}: {v:.3f}\n" for k, v in guest.boot_timings.items())
    )
    _save_screen(guest, folder)
    _save_journal(guest, folder, keep_running)
    return folder


def _save_events(machine: Machine, folder: Path) -> None:
    if machine.events_note is not None:
        (folder / "qmp-events-none.txt").write_text(machine.events_note + "\n")
        return
    (folder / "qmp-events.txt").write_text(format_events(machine.events))


def _save_screen(guest: Guest, folder: Path) -> None:
    """What the display showed: the picture and, in a text mode, the text."""
    machine = guest.machine
    if machine is None or not guest.is_running:
        (folder / "screen-error.txt").write_text("no screenshot: the guest was not running\n")
        return
    try:
        if guest.has_display:
            guest.screenshot(folder / _SCREEN)
            try:
                text = guest.screen_text()  # VGA text, else OCR
            except KvmError:  # no tesseract, or it failed: the picture is saved
                text = ""
            if text:
                (folder / "screen.txt").write_text(text + "\n")
        elif machine.has_vga:
            _screendump(machine, folder / _SCREEN)
        else:
            (folder / "screen-error.txt").write_text(
                "no screenshot: the guest has no display (display=True or --kvm-vnc give one)\n"
            )
    except Exception as exc:  # never lose the report for a screenshot
        (folder / "screen-error.txt").write_text(f"no screenshot: {exc}\n")


def _screendump(machine: Machine, dest: Path) -> None:
    """A PNG of a qemu guest's display (every one has at least an ISA VGA card)."""
    data = machine.screenshot()
    dest.write_bytes(data if data.startswith(PNG_MAGIC) else ppm_to_png(data))


def _save_journal(guest: Guest, folder: Path, keep_running: bool) -> None:
    if guest.config.blank:
        (folder / "journal-source.txt").write_text(
            "no journal: an installer's guest (its disk holds what it was installing)\n"
        )
        return
    # One quick look first: a guest whose network is gone would otherwise cost each
    # SSH step below its whole timeout (minutes under TCG) before the disk is read.
    answers = guest.is_running and guest.answers_ssh(SSH_LOOK)
    try:
        if keep_running and guest.is_running and not answers:
            raise KvmError(
                f"the guest did not answer over SSH within {SSH_LOOK:.0f} s, and it is "
                "kept running, so its disk is not read"
            )
        if keep_running and guest.is_running:
            result = guest.run("journalctl -b --no-pager -o short", timeout=30)
            if result.exit_status != 0:
                if _save_kernel_log(guest, folder):
                    return
                raise KvmError(f"journalctl failed (exit {result.exit_status})")
            text, source = result.stdout, "journalctl over SSH (the guest is kept running)"
        elif answers and _save_kernel_log(guest, folder):
            return
        else:
            text, source = guest.journal_text(timeout=30, ssh=answers)
        (folder / "journal.txt").write_text(text)
        (folder / "journal-source.txt").write_text(source + "\n")
    except (KvmError, OSError) as exc:  # KvmUnavailable: no libguestfs
        (folder / "journal-source.txt").write_text(f"no journal: {exc}\n")


def _save_kernel_log(guest: Guest, folder: Path) -> bool:
    """A running guest that answers SSH and has no systemd: note that there is no
    journal and save ``dmesg`` (the tail of ``/var/log/syslog`` if dmesg fails)
    instead. False for a systemd guest, or one that cannot be asked."""
    try:
        transport = guest.ssh.get_transport() if guest.is_running else None
        if transport is None or not transport.is_active() or guest.init_system == "systemd":
            return False
        init = guest.init_system
        result = guest.run("dmesg || tail -n 2000 /var/log/syslog", timeout=30)
    except KvmError:
        return False
    (folder / "dmesg.txt").write_text(result.stdout)
    (folder / "journal-source.txt").write_text(
        f"no journal: not a systemd guest (PID 1 is {init!r}); "
        f"dmesg.txt holds its kernel log (exit {result.exit_status}), over SSH\n"
    )
    return True


def html_enabled(config: pytest.Config) -> bool:
    """pytest-html is active (``--html``) and importable: extras are worth making."""
    if not config.pluginmanager.hasplugin("html") or not config.getoption("htmlpath", None):
        return False
    try:
        import pytest_html  # noqa: F401
    except ImportError:
        return False
    return True


def html_extras(config: pytest.Config, guest_name: str, folder: Path, console: str) -> list[Any]:
    """pytest-html extras for one failed guest: its screenshot and console tail; []
    without pytest-html (or when it is not active)."""
    if not html_enabled(config):
        return []
    from pytest_html import extras

    found: list[Any] = []
    screen = folder / _SCREEN
    if screen.is_file():
        found.append(
            extras.png(base64.b64encode(screen.read_bytes()).decode(), f"{guest_name}: screen")
        )
    if console:
        found.append(extras.text(console, f"{guest_name}: console tail"))
    return found
