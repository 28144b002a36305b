"""Failure artifacts, without QEMU: fakes for the guest and machine."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pytest_kvm import artifacts
from tests.support.machine import FakeMachine

EVENTS = [
    {"event": "RESUME", "timestamp": {"seconds": 1700000000, "microseconds": 12}},
    {
        "data": {"guest": True, "reason": "guest-shutdown"},
        "event": "SHUTDOWN",
        "timestamp": {"seconds": 1700000005, "microseconds": 345678},
    },
]


def test_events_are_json_lines_with_their_timestamp_first():
    text = artifacts.format_events(EVENTS)
    lines = text.splitlines()
    assert text.endswith("\n") and len(lines) == 2
    parsed = [json.loads(line) for line in lines]
    assert [e["event"] for e in parsed] == ["RESUME", "SHUTDOWN"]
    assert parsed[1]["timestamp"] == {"seconds": 1700000005, "microseconds": 345678}
    assert parsed[1]["data"]["reason"] == "guest-shutdown"
    assert all(line.startswith('{"timestamp": ') for line in lines)
    assert artifacts.format_events([]) == ""


def test_timings_read_as_a_line_and_a_report_section():
    timings = {"overlay": 0.0123, "restore": 0.9, "ssh_ready": 0.5, "total": 1.6}
    assert artifacts.format_timings(timings) == (
        "overlay 0.01 s, restore 0.90 s, ssh_ready 0.50 s, total 1.60 s"
    )
    title, text = artifacts.timings_section("kvm-ab12-main-01", timings)
    assert title == "kvm boot timings: kvm-ab12-main-01" and text.startswith("overlay 0.01 s")


def test_folder_names_are_safe(tmp_path: Path):
    folder = artifacts.folder_for(tmp_path, "tests/test_a.py::test_b[debian-12]", "kvm-1")
    assert folder == tmp_path / "tests_test_a.py__test_b[debian-12]" / "kvm-1"


def fake_guest(tmp_path: Path, machine: Any) -> Any:
    log = tmp_path / "run" / "serial.log"
    log.parent.mkdir(exist_ok=True)
    log.write_text("[    0.000000] Linux version 6.1\nlogin: \n")
    return SimpleNamespace(
        name="kvm-1",
        serial_log=log,
        machine=machine,
        boot_timings={"overlay": 0.01, "total": 1.5},
        is_running=False,
        has_display=False,
        config=SimpleNamespace(blank=True),  # an installer's guest: no journal to read
    )


def test_save_writes_every_part_or_a_note(tmp_path: Path):
    guest = fake_guest(tmp_path, FakeMachine(EVENTS))
    folder = artifacts.save(guest, tmp_path / "arts", "t.py::test_x")
    assert folder == tmp_path / "arts" / "t.py__test_x" / "kvm-1"
    assert (folder / "serial.log").read_text().startswith("[    0.000000] Linux version")
    assert (folder / "qemu-argv.txt").read_text() == "qemu-system-x86_64\n-name\nguest=kvm-1\n"
    events = [json.loads(line) for line in (folder / "qmp-events.txt").read_text().splitlines()]
    assert [e["event"] for e in events] == ["RESUME", "SHUTDOWN"]
    assert (folder / "boot-timings.txt").read_text() == "overlay: 0.010\ntotal: 1.500\n"
    assert (folder / "screen-error.txt").read_text().startswith("no screenshot: ")
    assert (folder / "journal-source.txt").read_text().startswith("no journal: ")


def test_libvirt_guests_get_a_note_instead_of_events(tmp_path: Path):
    from pytest_kvm.backends.libvirt import LibvirtMachine

    machine = LibvirtMachine.__new__(LibvirtMachine)  # no domain: argv from its XML
    machine.target = SimpleNamespace(uri="qemu:///session")  # type: ignore[assignment]
    machine.domain_name = "pytest-kvm-kvm-1"
    machine._xml = "<domain/>"
    folder = artifacts.save(fake_guest(tmp_path, machine), tmp_path / "arts", "t.py::test_y")
    assert not (folder / "qmp-events.txt").exists()
    note = (folder / "qmp-events-none.txt").read_text()
    assert note.startswith("no QMP events: ") and note.count("\n") == 1


def test_no_html_extras_without_an_html_report(pytestconfig: Any, tmp_path: Path):
    # This run writes no --html report: nothing is attached.
    assert artifacts.html_extras(pytestconfig, "kvm-1", tmp_path, "tail") == []


def test_a_kept_guest_is_not_stopped_for_its_journal(tmp_path: Path):
    guest = fake_guest(tmp_path, FakeMachine([]))
    guest.config = SimpleNamespace(blank=False)
    guest.is_running = True
    ran: list[str] = []

    def run(cmd: str, timeout: float = 60) -> Any:
        ran.append(cmd)
        return SimpleNamespace(exit_status=0, stdout="Nov 26 sshd[1]: ready\n", stderr="")

    def journal_text(timeout: float = 60) -> Any:
        raise AssertionError("journal_text may stop the guest to read its disk")

    guest.run, guest.journal_text = run, journal_text
    guest.answers_ssh = lambda timeout: True
    folder = artifacts.save(guest, tmp_path / "arts", "t.py::test_k", keep_running=True)
    assert ran == ["journalctl -b --no-pager -o short"]
    assert (folder / "journal.txt").read_text() == "Nov 26 sshd[1]: ready\n"
    assert "kept running" in (folder / "journal-source.txt").read_text()
    assert (folder / "qmp-events.txt").read_text() == ""


def test_a_guest_that_does_not_answer_ssh_is_asked_once_then_read_from_its_disk(
    tmp_path: Path,
):
    """Its network gone: one quick look, then no SSH step waits out its timeout."""
    guest = fake_guest(tmp_path, FakeMachine([]))
    guest.config = SimpleNamespace(blank=False)
    guest.is_running = True
    looks: list[float] = []
    asked: list[bool] = []

    def answers_ssh(timeout: float = 10) -> bool:
        looks.append(timeout)
        return False

    def run(cmd: str, timeout: float = 60) -> Any:
        raise AssertionError(f"ran {cmd!r} over SSH on a guest that does not answer")

    def journal_text(timeout: float = 60, ssh: bool = True) -> Any:
        asked.append(ssh)
        return "Nov 27 kernel: link down\n", "the disk, read with libguestfs"

    guest.answers_ssh, guest.run, guest.journal_text = answers_ssh, run, journal_text
    guest.ssh = SimpleNamespace(get_transport=lambda: None)
    folder = artifacts.save(guest, tmp_path / "arts", "t.py::test_n")
    assert looks == [artifacts.SSH_LOOK] and asked == [False]
    assert (folder / "journal.txt").read_text() == "Nov 27 kernel: link down\n"
    # Kept running (--kvm-keep-on-failure): its disk is not read; a note says why.
    kept = artifacts.save(guest, tmp_path / "arts2", "t.py::test_n", keep_running=True)
    note = (kept / "journal-source.txt").read_text()
    assert note.startswith("no journal: the guest did not answer over SSH within 10 s")
    assert asked == [False] and not (kept / "journal.txt").exists()
