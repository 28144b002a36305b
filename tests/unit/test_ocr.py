"""OCR of a graphical screen: when ``screen_text`` falls back to tesseract, what it
runs, the error without tesseract, and ``wait_for_text``. Fakes: a machine answering
the monitor and a ``tesseract`` script on PATH (the real one is in
tests/integration/test_screen_ocr.py)."""

from __future__ import annotations

import re
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pytest_kvm.display import PNG_MAGIC
from pytest_kvm.errors import GuestCrashed, GuestError, GuestTimeout, KvmUnavailable
from pytest_kvm.guest.screen import Screen
from pytest_kvm.guest.state import GuestState
from pytest_kvm.ocr import PACKAGE, OcrFailed, OcrUnavailable, clean_text, ocr_text

PICTURE = PNG_MAGIC + b"a picture"


class FakeMachine:
    """Answers the monitor's VGA reads with ``vga`` (text cells or pixels)."""

    def __init__(self, vga: bytes) -> None:
        self.vga = vga
        self.shots = 0

    def is_running(self) -> bool:
        return True

    def qmp(self, command: str, **args: Any) -> str:
        line = args["command-line"]
        if line.startswith("i /b"):
            return "0x03d5 = 0x00"
        if line.startswith("xp"):
            return " ".join(f"0x{b:02x}" for b in self.vga)
        return ""

    def screenshot(self) -> bytes:
        self.shots += 1
        return PICTURE


def text_cells(text: str) -> bytes:
    return b"".join(bytes([ord(c), 0x07]) for c in text.ljust(80 * 25))


def screen(tmp_path: Path, machine: FakeMachine, display: bool = True) -> Screen:
    state = GuestState(name="g1", what="guest 'g1'", timeout_scale=1.0, mac="", address="",
                       workdir=tmp_path, machine=machine)  # type: ignore[arg-type]  # fmt: skip
    return Screen(state, display=display, vnc=False, progress=lambda _: None)


@pytest.fixture
def fake_tesseract(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A ``tesseract`` that records its argv and stdin and prints ``said.txt``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "tesseract"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" > {tmp_path}/argv\n'
        f"/bin/cat > {tmp_path}/stdin\n"
        f'[ -e {tmp_path}/fail ] && {{ echo "Error: bad image" >&2; exit 1; }}\n'
        f"/bin/cat {tmp_path}/said.txt\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    (tmp_path / "said.txt").write_text("\n  Debian installer   \nSelect a language\n\f")
    monkeypatch.setenv("PATH", str(bin_dir))
    return tmp_path


def test_text_mode_is_read_without_ocr(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no tesseract: not needed
    machine = FakeMachine(text_cells("GNU GRUB  version 2.06"))
    assert screen(tmp_path, machine).screen_text() == "GNU GRUB  version 2.06"
    assert machine.shots == 0


def test_graphics_mode_falls_back_to_ocr(fake_tesseract):
    machine = FakeMachine(bytes(range(256)) * 15)  # pixels, not text cells
    text = screen(fake_tesseract, machine).screen_text()
    assert text == "  Debian installer\nSelect a language"
    assert machine.shots == 1
    assert (fake_tesseract / "stdin").read_bytes() == PICTURE
    assert (fake_tesseract / "argv").read_text().split() == ["stdin", "stdout", "--psm", "6"]


def test_no_display_reads_nothing(fake_tesseract):
    machine = FakeMachine(b"")
    assert screen(fake_tesseract, machine, display=False).screen_text() == ""
    assert machine.shots == 0


def test_missing_tesseract_is_one_line_naming_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    machine = FakeMachine(bytes(4000))
    with pytest.raises(OcrUnavailable) as caught:
        screen(tmp_path, machine).screen_text()
    message = str(caught.value)
    assert isinstance(caught.value, KvmUnavailable)
    assert "\n" not in message
    assert f"install Debian's {PACKAGE} package" in message
    assert PACKAGE == "tesseract-ocr"
    # Messages and artifacts go on without it.
    assert screen(tmp_path, machine).quiet_text() == ""


def test_failing_tesseract_names_the_guest_and_its_message(fake_tesseract):
    (fake_tesseract / "fail").touch()
    with pytest.raises(GuestError, match=r"guest 'g1': OCR of the screen: tesseract exited 1: "
                       r"Error: bad image"):  # fmt: skip
        screen(fake_tesseract, FakeMachine(bytes(4000))).screen_text()
    with pytest.raises(OcrFailed):
        ocr_text(PICTURE)


def test_wait_for_text_returns_the_match(fake_tesseract):
    found = screen(fake_tesseract, FakeMachine(bytes(4000))).wait_for_text(r"Select an? (\w+)", 5)
    assert found.group(1) == "language"


def test_wait_for_text_times_out_with_the_last_text(fake_tesseract):
    shown = screen(fake_tesseract, FakeMachine(bytes(4000)))
    with pytest.raises(GuestTimeout) as caught:
        shown.wait_for_text(re.compile(r"Installation complete"), 0.0)
    message = str(caught.value)
    assert "did not show 'Installation complete' within 0 s" in message
    assert "it last showed:\n  Debian installer\nSelect a language\n---" in message


def test_wait_for_text_needs_a_display(fake_tesseract):
    with pytest.raises(GuestError, match="wait_for_text needs a display"):
        screen(fake_tesseract, FakeMachine(b""), display=False).wait_for_text("x", 1)


def test_clean_text():
    assert clean_text("\n\nA  \n\nB\n\f\n") == "A\n\nB"
    assert clean_text("\f") == ""


def test_ocr_runs_tesseract_on_one_thread(fake_tesseract):
    script = fake_tesseract / "bin" / "tesseract"
    script.write_text(f'#!/bin/sh\necho "$OMP_THREAD_LIMIT" > {fake_tesseract}/said.txt\n'
                      f"/bin/cat {fake_tesseract}/said.txt\n")  # fmt: skip
    assert ocr_text(PICTURE) == "1"


def test_wait_for_text_ends_when_the_guest_dies(fake_tesseract):
    machine = FakeMachine(bytes(4000))
    shown = screen(fake_tesseract, machine)
    log = fake_tesseract / "serial.log"
    log.write_text("Kernel panic - not syncing: Attempted to kill init!\n")
    shown._state.console = SimpleNamespace(log_path=log)  # type: ignore[assignment]
    with pytest.raises(GuestCrashed, match=r"panicked: Kernel panic.*waiting for the screen to "
                       r"show 'Installation complete'"):  # fmt: skip
        shown.wait_for_text("Installation complete", 600)
