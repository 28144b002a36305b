import threading
import time

import pytest

from pytest_kvm.console import Console, tail
from pytest_kvm.errors import GuestTimeout


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
