"""Screen text by OCR on one restored guest with a display: its console is a
framebuffer (bochs-drm), so there is no VGA text to read and ``screen_text`` /
``wait_for_text`` read the screenshot with tesseract (Debian's tesseract-ocr, which
scripts/setup.sh installs: without it this test fails with the error naming it)."""

from __future__ import annotations

import shlex

import pytest

PHRASE = "OCR CHECK 4711 FRAMEBUFFER TEXT"
TO_TTY1 = "import fcntl, os; fcntl.ioctl(os.open('/dev/tty0', os.O_RDWR), 0x5606, 1)"


@pytest.mark.kvm(vnc=True)
def test_text_on_a_framebuffer_console_is_read_by_ocr(kvm_guest):
    g = kvm_guest
    assert "drm" in g.succeed("cat /sys/class/graphics/fb0/name")  # a graphics mode
    # tty1 in front (VT_ACTIVATE: the image has no chvt), its getty stopped; clear it
    # and show the phrase there.
    shown = f"\033[H\033[2J\n\n  {PHRASE}\n"
    g.succeed(
        "systemctl stop getty@tty1 && "
        f"python3 -c {shlex.quote(TO_TTY1)} && "
        f"printf %s {shlex.quote(shown)} > /dev/tty1"
    )
    found = g.wait_for_text(r"OCR CHECK (\d+) FRAMEBUFFER", timeout=120)
    assert found.group(1) == "4711"
    assert PHRASE in g.get_screen_text()  # the NixOS name, same reader
