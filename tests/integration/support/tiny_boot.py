"""The smallest bootable install medium: a CD whose El Torito boot image (no
emulation, 16-bit real mode) prints a line on the serial port, waits for one byte
on it, then powers the machine off through the q35 chipset's ACPI PM1a control
register. It boots in a second even under TCG, so the installer plumbing (blank
disk, ``boot="cdrom"``, console, screen, ``wait_for_shutdown``) is tested on every
backend without the cost of a real installer.
"""

from __future__ import annotations

import io
from pathlib import Path

import pycdlib

MESSAGE = b"pytest-kvm tiny installer: press a key to power off\r\n"


def boot_code(message: bytes = MESSAGE) -> bytes:
    """The boot image: position-independent (finds its message from IP), 2048 bytes."""
    head = bytes(
        [
            0xFA,  # cli
            0xFC,  # cld
            0x0E,  # push cs
            0x1F,  # pop ds
            0xE8, 0x00, 0x00,  # call next  (pushes the address of next)
        ]
    )  # fmt: skip
    after_call = len(head)
    body = bytes(
        [
            0x5E,  # pop si           ; si = address of "next"
            0x83, 0xC6, 0x00,  # add si, imm8     ; patched below: message - next
            0xBA, 0xF8, 0x03,  # mov dx, 0x3f8    ; COM1 data
            0xAC,  # print: lodsb
            0x84, 0xC0,  # test al, al
            0x74, 0x03,  # jz waitkey
            0xEE,  # out dx, al
            0xEB, 0xF8,  # jmp print
            0xBA, 0xFD, 0x03,  # waitkey: mov dx, 0x3fd  ; COM1 line status
            0xEC,  # poll: in al, dx
            0xA8, 0x01,  # test al, 1       ; data ready
            0x74, 0xFB,  # jz poll
            0xBA, 0x04, 0x06,  # mov dx, 0x604    ; q35 PM1a control (PM base 0x600)
            0xB8, 0x00, 0x20,  # mov ax, 0x2000   ; SLP_EN, S5
            0xEF,  # out dx, ax
            0xF4,  # halt: hlt
            0xEB, 0xFD,  # jmp halt
        ]
    )  # fmt: skip
    code = bytearray(head + body)
    code[after_call + 3] = len(code) - after_call  # the message follows the code
    code += message + b"\0"
    if len(code) > 2048:
        raise ValueError("message too long for the boot image")
    return bytes(code.ljust(2048, b"\0"))


def build_tiny_iso(path: Path, message: bytes = MESSAGE) -> Path:
    """Write the bootable ISO to ``path``."""
    image = boot_code(message)
    iso = pycdlib.PyCdlib()
    iso.new(vol_ident="PKVM_TINY")
    iso.add_fp(io.BytesIO(image), len(image), "/BOOT.IMG;1")
    iso.add_eltorito("/BOOT.IMG;1", bootcatfile="/BOOT.CAT;1", media_name="noemul",
                     boot_load_size=len(image) // 512)  # fmt: skip
    try:
        iso.write(str(path))
    finally:
        iso.close()
    return path
