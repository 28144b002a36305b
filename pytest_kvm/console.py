"""The serial console: QEMU writes everything to a log file from power-on; we read and type."""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .errors import GuestCrashed, GuestTimeout
from .util import tail as tail  # re-exported: callers import it from here


class Console:
    """Expect and send on a guest's serial console.

    ``expect`` searches the log file (the whole output since power-on) from where the
    previous match ended; ``send`` types into QEMU's console socket. ``alive`` (the
    guest's "is it alive?": "" while it may still print, else what happened) is asked
    about once a second while ``expect`` waits: a guest that panicked or whose QEMU
    exited is ``GuestCrashed`` at once, not a wait to the end of the timeout.
    """

    def __init__(
        self,
        log_path: Path,
        socket_path: Path,
        describe: str = "guest",
        alive: Callable[[], str] | None = None,
        guest: str | None = None,
    ) -> None:
        self.log_path = log_path
        self.socket_path = socket_path
        self.describe = describe
        self._alive = alive
        self._guest = guest
        self._pos = 0
        self._sock: socket.socket | None = None
        self._drain: threading.Thread | None = None

    def read_all(self) -> str:
        try:
            return self.log_path.read_bytes().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def skip_to_end(self) -> None:
        """Later expects only see output from now on."""
        self._pos = len(self.read_all())

    def expect(self, regex: str | re.Pattern[str], timeout: float = 60.0) -> re.Match[str]:
        __tracebackhide__ = True
        pattern = re.compile(regex) if isinstance(regex, str) else regex
        deadline = time.monotonic() + timeout
        next_look = time.monotonic() + 1.0
        dead = ""
        while True:
            text = self.read_all()
            match = pattern.search(text, self._pos)
            if match:
                self._pos = match.end()
                return match
            if dead:  # read again after it died: what it printed last was searched
                raise GuestCrashed(
                    f"{dead}; the console did not show /{pattern.pattern}/; last console "
                    f"lines:\n{tail(self.log_path, 15)}",
                    self._guest,
                )
            if self._alive is not None and time.monotonic() >= next_look:
                next_look = time.monotonic() + 1.0
                dead = self._alive()
                if dead:
                    continue
            if time.monotonic() >= deadline:
                raise GuestTimeout(
                    f"{self.describe}: console did not show /{pattern.pattern}/ within "
                    f"{timeout:.0f} s; last console lines:\n{tail(self.log_path, 15)}"
                )
            time.sleep(0.05)

    def send(self, text: str | bytes) -> None:
        data = text.encode() if isinstance(text, str) else text
        self._connect().sendall(data)

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(self.socket_path))
            self._sock = sock
            # QEMU writes to the log only what the socket accepted: keep reading.
            self._drain = threading.Thread(target=self._discard, args=(sock,), daemon=True)
            self._drain.start()
        return self._sock

    @staticmethod
    def _discard(sock: socket.socket) -> None:
        try:
            while sock.recv(65536):
                pass
        except OSError:
            pass

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        if self._drain is not None:
            self._drain.join(timeout=2)
            self._drain = None
