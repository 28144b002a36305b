"""Keys, screenshots and the VGA text screen: the pure parts."""

import pytest

from pytest_kvm.display import (
    key_chord,
    png_size,
    ppm_to_png,
    qmp_keys,
    text_chords,
    vga_text,
    vnc_password,
)
from pytest_kvm.errors import KvmConfigError
from tests.support.images import decode_png


def test_key_chords_and_aliases():
    assert key_chord("ret") == ["ret"]
    assert key_chord("Enter") == ["ret"]
    assert key_chord("ctrl-alt-delete") == ["ctrl", "alt", "delete"]
    assert key_chord("ctrl-alt-f2") == ["ctrl", "alt", "f2"]
    assert key_chord("a") == ["a"] and key_chord("7") == ["7"]
    assert key_chord("-") == ["minus"]
    assert qmp_keys(["shift", "a"]) == [
        {"type": "qcode", "data": "shift"},
        {"type": "qcode", "data": "a"},
    ]


@pytest.mark.parametrize("bad", ["", "ctrl--", "hyper", "ctrl-", "é", "f13"])
def test_unknown_keys_are_clear_errors(bad):
    with pytest.raises(KvmConfigError, match="send_keys"):
        key_chord(bad)


def test_text_becomes_us_keyboard_chords():
    assert text_chords("aB1 -\n") == [
        ["a"], ["shift", "b"], ["1"], ["spc"], ["minus"], ["ret"],
    ]  # fmt: skip
    assert text_chords("!:") == [["shift", "1"], ["shift", "semicolon"]]
    with pytest.raises(KvmConfigError, match="no key on a US keyboard"):
        text_chords("ü")


def test_ppm_to_png_keeps_every_pixel():
    pixels = bytes(range(2 * 3 * 3))  # 3x2, RGB
    ppm = b"P6\n# made by a test\n3 2\n255\n" + pixels
    png = ppm_to_png(ppm)
    assert png_size(png) == (3, 2)
    assert decode_png(png) == (3, 2, pixels)
    with pytest.raises(ValueError, match="not a binary PPM"):
        ppm_to_png(b"P3\n1 1\n255\n0 0 0\n")
    with pytest.raises(ValueError, match="truncated"):
        ppm_to_png(b"P6 3 2 255\n" + pixels[:-1])


def test_vga_text_reads_characters_not_attributes():
    line = "Hello VGA".ljust(80)
    cells = b"".join(bytes([ord(c), 0x07]) for c in line * 2 + " " * 80 * 23)
    assert vga_text(cells) == "Hello VGA\nHello VGA"
    assert vga_text(bytes(range(256)) * 16) == ""  # a graphics mode's bytes
    assert vga_text(b"") == ""


def test_vnc_password_is_random_and_vnc_sized():
    first, second = vnc_password(), vnc_password()
    assert len(first) == 8 and first.isalnum() and first != second
