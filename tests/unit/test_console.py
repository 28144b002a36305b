import threading
import time

import pytest

from pytest_kvm.console import Console, tail
from pytest_kvm.errors import GuestCrashed, GuestTimeout


def test_expect_advances_past_each_match(tmp_path):
    log = tmp_path / "serial.log"
    log.write_text("boot\nlogin: \nlogin: again\n")
    console = Console(log, tmp_path / "c.sock")
    assert console.expect("login:").start() == 5
    assert console.expect(r"login: (\w+)").group(1) == "again"


def test_expect_waits_for_output_written_later(tmp_path):
    log = tmp_path / "serial.log"
    log.write_text("")

    def later():
        time.sleep(0.3)
        with log.open("a") as f:
            f.write("Reached target Multi-User System\n")

    threading.Thread(target=later).start()
    assert Console(log, tmp_path / "c.sock").expect("Multi-User", timeout=5)


def test_timeout_says_what_it_last_saw(tmp_path):
    log = tmp_path / "serial.log"
    log.write_text("[  OK  ] Started ssh.service\nstuck here\n")
    with pytest.raises(GuestTimeout, match=r"(?s)did not show /never/.*stuck here"):
        Console(log, tmp_path / "c.sock", "guest 'g'").expect("never", timeout=0.2)


def test_tail_strips_escape_sequences(tmp_path):
    log = tmp_path / "serial.log"
    log.write_bytes(b"a\r\n\x1b[0;32m  OK  \x1b[0m b\r\nc\n")
    assert tail(log, 2) == "  OK   b\nc"
    assert tail(tmp_path / "missing") == ""


def test_a_guest_that_dies_while_expect_waits_is_crashed_at_once(tmp_path):
    """A kernel panic (or QEMU's exit) ends the wait with GuestCrashed and the console,
    instead of a wait to the end of the timeout."""
    log = tmp_path / "serial.log"
    log.write_text("[    0.056000] Kernel panic - not syncing: IO-APIC + timer doesn't work!\n")
    console = Console(log, tmp_path / "c.sock", "guest 'g'", alive=lambda: "g panicked", guest="g")
    # (were it waited out, the error would be GuestTimeout, ten minutes later)
    with pytest.raises(GuestCrashed, match=r"(?s)g panicked; the console did not show /login:/"):
        console.expect("login:", timeout=600)


def test_what_a_dying_guest_printed_last_is_still_found(tmp_path):
    log = tmp_path / "serial.log"
    log.write_text("reboot: Power down\n")
    console = Console(log, tmp_path / "c.sock", alive=lambda: "QEMU exited (status 0)")
    assert console.expect("Power down", timeout=5)
