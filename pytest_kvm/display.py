"""The guest's display: screenshots as PNG, key presses, the text on a VGA text screen,
and the VNC password. Pure helpers; the guest and backends do the talking.

Installers that only draw on a screen are driven with key presses (QMP ``send-key``)
and watched with screenshots. A screen in VGA text mode (BIOS, boot loaders, a Linux
console without a framebuffer driver) can also be read as text from the VGA text
buffer at 0xb8000, which is what a timeout message shows as "the last screen".
"""

from __future__ import annotations

import re
import secrets
import string
import struct
import zlib

from .errors import KvmConfigError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Names QEMU's send-key takes (its QKeyCode enum), beyond letters and digits; also
# the spellings of HMP's sendkey, which people know.
_NAMED_KEYS = frozenset(
    [
        "shift",
        "shift_r",
        "alt",
        "alt_r",
        "ctrl",
        "ctrl_r",
        "menu",
        "esc",
        "minus",
        "equal",
        "backspace",
        "tab",
        "bracket_left",
        "bracket_right",
        "ret",
        "semicolon",
        "apostrophe",
        "grave_accent",
        "backslash",
        "comma",
        "dot",
        "slash",
        "asterisk",
        "spc",
        "caps_lock",
        "num_lock",
        "scroll_lock",
        "sysrq",
        "print",
        "home",
        "pgup",
        "pgdn",
        "end",
        "left",
        "right",
        "up",
        "down",
        "insert",
        "delete",
        "meta_l",
        "meta_r",
        "less",
        "f1",
        "f2",
        "f3",
        "f4",
        "f5",
        "f6",
        "f7",
        "f8",
        "f9",
        "f10",
        "f11",
        "f12",
        "kp_0",
        "kp_1",
        "kp_2",
        "kp_3",
        "kp_4",
        "kp_5",
        "kp_6",
        "kp_7",
        "kp_8",
        "kp_9",
        "kp_add",
        "kp_subtract",
        "kp_multiply",
        "kp_divide",
        "kp_enter",
        "kp_decimal",
        "pause",
        "power",
        "sleep",
        "wake",
    ]
)
_ALIASES = {"enter": "ret", "return": "ret", "space": "spc", "escape": "esc",
            "del": "delete", "pageup": "pgup", "pagedown": "pgdn", "control": "ctrl"}  # fmt: skip

# Characters a US keyboard types with one key (plus shift): what type_text can send.
_PLAIN = {" ": "spc", "-": "minus", "=": "equal", "[": "bracket_left",
          "]": "bracket_right", ";": "semicolon", "'": "apostrophe", "`": "grave_accent",
          "\\": "backslash", ",": "comma", ".": "dot", "/": "slash", "\n": "ret",
          "\t": "tab"}  # fmt: skip
_SHIFTED = {"_": "minus", "+": "equal", "{": "bracket_left", "}": "bracket_right",
            ":": "semicolon", '"': "apostrophe", "~": "grave_accent", "|": "backslash",
            "<": "comma", ">": "dot", "?": "slash", "!": "1", "@": "2", "#": "3",
            "$": "4", "%": "5", "^": "6", "&": "7", "*": "8", "(": "9", ")": "0"}  # fmt: skip


def _qcode(name: str) -> str:
    key = _ALIASES.get(name.lower(), name.lower())
    if len(key) == 1 and (key.isascii() and key.isalnum()):
        return key
    if key in _NAMED_KEYS:
        return key
    raise KvmConfigError(
        f"send_keys: unknown key {name!r}: use QEMU's key names (ret, esc, tab, spc, "
        "f1..f12, up, down, a..z, 0..9, ...) joined by '-' for chords (ctrl-alt-delete)"
    )


def key_chord(spec: str) -> list[str]:
    """``"ctrl-alt-delete"`` -> the qcodes pressed together, checked."""
    if not isinstance(spec, str) or not spec.strip():
        raise KvmConfigError(f"send_keys: {spec!r} is not a key name")
    # A lone "-" is the minus key; otherwise '-' joins the keys of a chord.
    parts = ["minus"] if spec == "-" else spec.split("-")
    if any(not part for part in parts):
        raise KvmConfigError(f"send_keys: {spec!r} is not a key or chord like ctrl-alt-f1")
    return [_qcode(part) for part in parts]


def text_chords(text: str) -> list[list[str]]:
    """The chords that type ``text`` on a US keyboard layout."""
    chords: list[list[str]] = []
    for char in text:
        if char in _PLAIN:
            chords.append([_PLAIN[char]])
        elif char in _SHIFTED:
            chords.append(["shift", _SHIFTED[char]])
        elif char.isascii() and char.isalpha():
            chords.append(["shift", char.lower()] if char.isupper() else [char])
        elif char.isascii() and char.isdigit():
            chords.append([char])
        else:
            raise KvmConfigError(
                f"type_text: {char!r} has no key on a US keyboard; send it another way "
                "(the serial console, or a file)"
            )
    return chords


def qmp_keys(chord: list[str]) -> list[dict[str, str]]:
    """QMP ``send-key`` ``keys`` for one chord."""
    return [{"type": "qcode", "data": key} for key in chord]


def ppm_to_png(data: bytes) -> bytes:
    """A binary PPM (P6, 8-bit, as QEMU and libvirt write screenshots) as PNG."""
    header = re.match(rb"P6\s+(?:#[^\n]*\n\s*)*(\d+)\s+(\d+)\s+(\d+)\s", data)
    if not header:
        raise ValueError("not a binary PPM (P6) image")
    width, height, maxval = (int(v) for v in header.groups())
    if maxval != 255:
        raise ValueError(f"PPM with maxval {maxval}: only 8-bit images are supported")
    pixels = data[header.end() :]
    stride = width * 3
    if len(pixels) < stride * height:
        raise ValueError("PPM image is truncated")
    raw = b"".join(
        b"\x00" + pixels[row * stride : (row + 1) * stride] for row in range(height)
    )  # filter type 0 per scanline

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        )  # fmt: skip

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        PNG_MAGIC
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + (chunk(b"IEND", b""))
    )


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) of a PNG."""
    if not data.startswith(PNG_MAGIC) or data[12:16] != b"IHDR":
        raise ValueError("not a PNG image")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


VGA_TEXT_ADDRESS = 0xB8000
VGA_TEXT_BYTES = 80 * 25 * 2


def vga_text(buffer: bytes, columns: int = 80) -> str:
    """The characters of a VGA text-mode screen (char, attribute pairs), as lines.

    Returns "" when the buffer does not look like text (a graphics mode leaves
    other bytes there)."""
    chars = buffer[0::2]
    if not chars:
        return ""
    printable = sum(32 <= c < 127 or c == 0 for c in chars)
    if printable < 0.9 * len(chars) or not any(33 <= c < 127 for c in chars):
        return ""
    text = chars.decode("cp437", errors="replace").replace("\x00", " ")
    lines = [text[i : i + columns].rstrip() for i in range(0, len(text), columns)]
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)


def vnc_password() -> str:
    """A random VNC password. VNC's authentication uses the first 8 characters only."""
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))
