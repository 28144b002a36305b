"""The progress lines of a long wait."""

from __future__ import annotations

from pathlib import Path

from pytest_kvm import progress


def test_last_console_line_is_clean_and_short(tmp_path: Path):
    log = tmp_path / "serial.log"
    log.write_bytes(
        b"early line\r\n\x1b[0;32m  OK  \x1b[0m] Started \x1b[0;1;39mssh.service\x1b[0m - "
        b"OpenBSD Secure Shell server and a long tail of words after it\r\n\r\n"
    )
    line = progress.last_console_line(log, width=40)
    assert line == "OK  ] Started ssh.service - OpenBSD S..."
    assert len(line) == 40 and "\x1b" not in line
    assert progress.last_console_line(tmp_path / "missing.log") == ""


def test_waiting_line_says_what_for_what_it_saw_and_how_long(tmp_path: Path):
    log = tmp_path / "serial.log"
    log.write_text("Loading initial ramdisk ...\n")
    assert progress.waiting_line("kvm-ab12-main-01", "SSH", log, 20.4) == (
        "pytest-kvm: guest kvm-ab12-main-01: waiting for SSH "
        "(console: Loading initial ramdisk ...), 20 s"
    )
    log.write_text("")
    assert "(console silent), 10 s" in progress.waiting_line("g", "SSH", log, 10)
