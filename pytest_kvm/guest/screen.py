"""A guest's display and keyboard: VNC, screenshots, key presses, typed text and the
text on the screen: read from VGA text mode, else by OCR of a screenshot (the pure
helpers are in ``pytest_kvm.display`` and ``pytest_kvm.ocr``)."""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

from ..backends.base import Machine, QmpError
from ..display import (
    PNG_MAGIC,
    VGA_TEXT_ADDRESS,
    VGA_TEXT_BYTES,
    key_chord,
    ppm_to_png,
    qmp_keys,
    text_chords,
    vga_text,
    vnc_password,
)
from ..errors import GuestCrashed, GuestError, GuestTimeout
from ..ocr import OcrFailed, OcrUnavailable, ocr_text
from .state import GuestState


class Screen:
    """The display of one guest: ``display`` (a graphics card), ``vnc`` (--kvm-vnc)."""

    def __init__(
        self,
        state: GuestState,
        *,
        display: bool,
        vnc: bool,
        progress: Callable[[str], None],
        text_mode: bool = True,
    ) -> None:
        self._state = state
        # A VGA text buffer at 0xB8000 behind I/O ports 0x3d4/0x3d5: x86 guests only
        # (an arm or riscv guest's screen is read by OCR).
        self._text_mode = text_mode
        self.has_display = display or vnc
        self._vnc = vnc
        self._progress = progress
        self._shots = 0
        # (host, port) of the VNC display (--kvm-vnc), once running.
        self.vnc: tuple[str, int] | None = None

    @property
    def password_file(self) -> Path | None:
        if not self._vnc or self._state.workdir is None:
            return None
        return self._state.workdir / "vnc-password"

    def write_password(self) -> None:
        """Read by the backend (libvirt puts it in the domain XML; for QEMU it is set
        over QMP once running): never argv, never a log."""
        secret = self.password_file
        if secret is None:
            return
        with contextlib.suppress(FileNotFoundError):
            secret.unlink()
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(vnc_password() + "\n")

    def start_vnc(self, machine: Machine) -> None:
        """QEMU: set the VNC password (refused to all until then); both: learn the port."""
        secret = self.password_file
        if secret is None:
            return
        machine.prepare_vnc(secret.read_text().strip())
        info = machine.qmp("query-vnc") or {}
        self.vnc = (str(info.get("host", "127.0.0.1")), int(info.get("service", 0)))
        self._progress(
            f"pytest-kvm: {self._state.what}: VNC on {self.vnc[0]}:{self.vnc[1]} "
            f"(display :{self.vnc[1] - 5900}), password in {secret}"
        )

    def _need_display(self, what: str) -> Machine:
        machine = self._state.machine
        if machine is None or not machine.is_running():
            raise GuestError(f"{self._state.what}: {what} needs a running guest", self._state.name)
        if not self.has_display:
            raise GuestError(
                f"{self._state.what}: {what} needs a display: pass display=True to "
                "kvm_guest_factory or run with --kvm-vnc (installer guests have one)",
                self._state.name,
            )
        return machine

    def screenshot(self, path: str | os.PathLike[str] | None = None) -> Path:
        """See ``Guest.screenshot``."""
        machine = self._need_display("a screenshot")
        assert self._state.workdir is not None
        self._shots += 1
        dest = (
            Path(path)
            if path is not None
            else self._state.workdir / f"screen-{self._shots:03d}.png"
        )
        data = machine.screenshot()
        if not data.startswith(PNG_MAGIC):
            data = ppm_to_png(data)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        return dest

    def send_keys(self, *keys: str, delay: float = 0.05) -> None:
        """See ``Guest.send_keys``."""
        machine = self._need_display("send_keys")
        chords = [key_chord(key) for key in keys]
        for chord in chords:
            machine.qmp("send-key", keys=qmp_keys(chord))
            time.sleep(delay)

    def type_text(self, text: str, delay: float = 0.02) -> None:
        """See ``Guest.type_text``."""
        machine = self._need_display("type_text")
        for chord in text_chords(text):
            machine.qmp("send-key", keys=qmp_keys(chord))
            time.sleep(delay)

    def screen_text(self) -> str:
        """See ``Guest.screen_text``: VGA text, else (a graphics mode) OCR."""
        machine = self._state.machine
        if machine is None or not machine.is_running() or not self.has_display:
            return ""
        text = self._vga_text(machine)
        return text if text else self._ocr(machine)

    def quiet_text(self) -> str:
        """``screen_text`` for messages and artifacts: "" where OCR is missing or fails."""
        try:
            return self.screen_text()
        except (OcrUnavailable, OcrFailed, GuestError):
            return ""

    def _ocr(self, machine: Machine) -> str:
        """The screen read by tesseract ("" when the guest stopped meanwhile)."""
        try:
            data = machine.screenshot()
        except (ConnectionError, QmpError, OSError, GuestError):
            return ""  # stopped meanwhile (libvirt: GuestLaunchError)
        try:
            return ocr_text(data)
        except OcrFailed as exc:
            raise GuestError(f"{self._state.what}: OCR of the screen: {exc}",
                             self._state.name) from None  # fmt: skip

    def wait_for_text(self, regex: str | re.Pattern[str], limit: float) -> re.Match[str]:
        """See ``Guest.wait_for_text`` (``limit``: seconds, already scaled)."""
        __tracebackhide__ = True
        self._need_display("wait_for_text")
        pattern = re.compile(regex) if isinstance(regex, str) else regex
        deadline = time.monotonic() + limit
        delay = 0.5
        while True:
            last_try = time.monotonic() >= deadline
            text = self.screen_text()
            match = pattern.search(text)
            if match:
                return match
            self._check_alive(pattern)
            if last_try:
                raise GuestTimeout(
                    f"{self._state.what}: the screen did not show {pattern.pattern!r} "
                    f"within {limit:.0f} s; it last showed:\n{text or '(no text)'}\n---",
                    self._state.name,
                )
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 1.5, 3.0)

    def _check_alive(self, pattern: re.Pattern[str]) -> None:
        """A guest that died (QEMU exited, a panic) ends the wait within a poll."""
        if self._state.console is None:
            return  # not started (a stand-in): no console to read a panic from
        dead = self._state.alive()
        if dead:
            raise GuestCrashed(
                f"{dead}; waiting for the screen to show {pattern.pattern!r}; console:\n"
                f"{self._state.crash_lines()}",
                self._state.name,
            )

    def _vga_text(self, machine: Machine) -> str:
        """The VGA text buffer as text; "" in a graphics mode (it holds pixels then)."""
        if not self._text_mode:
            return ""

        def hmp(line: str) -> str:
            return str(machine.qmp("human-monitor-command", **{"command-line": line}) or "")

        try:
            # A Linux console scrolls by moving the CRT controller's start address
            # through the 32 KiB text buffer: read it (registers 0x0c/0x0d) first.
            index = hmp("i /b 0x3d4").rsplit("=", 1)[-1].strip()
            start = 0
            for register in (0x0C, 0x0D):
                hmp(f"o /b 0x3d4 {register:#x}")
                start = (start << 8) | int(hmp("i /b 0x3d5").rsplit("=", 1)[-1].strip(), 16)
            hmp(f"o /b 0x3d4 {index}")
            address = VGA_TEXT_ADDRESS + min(2 * start, 0x8000 - VGA_TEXT_BYTES)
            out = hmp(f"xp /{VGA_TEXT_BYTES}xb {address:#x}")
        except (ConnectionError, QmpError, OSError, ValueError):
            return ""
        data = bytes(int(v, 16) for v in re.findall(r"\b0x([0-9a-f]{2})\b", out))
        return vga_text(data)
