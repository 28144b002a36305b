"""The NixOS test driver's names for what a Guest does, so that a NixOS ``testScript``
ports line by line: ``machine.wait_for_open_port(80)`` -> ``guest.wait_for_open_port(80)``.

Thin: each is the pytest-kvm method it names (same behaviour, same errors, timeouts
in seconds scaled under TCG like the rest), or, where none existed, a method of
``Commands``. Every path and command goes to the guest's shell quoted there."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .commands import Commands


class NixosNames:
    """Mixed into ``Guest``, which provides ``_commands`` and the methods named here
    (called through the Guest, so an alias follows what its method does)."""

    _commands: Commands

    if TYPE_CHECKING:

        def wait_for_port(self, port: int, timeout: float = 120) -> None: ...
        def type_text(self, text: str, delay: float = 0.02) -> None: ...
        def screen_text(self) -> str: ...

    def wait_for_open_port(self, port: int, timeout: float = 120) -> None:
        """NixOS's ``wait_for_open_port``: ``wait_for_port``, until something in the
        guest listens on TCP ``port`` (any address; NixOS's ``addr=`` is not taken)."""
        __tracebackhide__ = True
        self.wait_for_port(port, timeout)

    def wait_until_fails(self, cmd: str, timeout: float = 120) -> str:
        """Retry ``cmd`` until it exits non-zero (the opposite of
        ``wait_until_succeeds``); returns its output (stdout, else stderr)."""
        __tracebackhide__ = True
        return self._commands.wait_until_fails(cmd, timeout)

    def wait_for_file(self, path: str, timeout: float = 120) -> None:
        """Wait until ``path`` exists in the guest (``test -e``, the path quoted)."""
        __tracebackhide__ = True
        self._commands.wait_for_file(path, timeout)

    def send_chars(self, text: str, delay: float = 0.02) -> None:
        """NixOS's ``send_chars``: ``type_text``, typed on the guest's keyboard (needs a
        display: ``display=True``, ``--kvm-vnc`` or an installer guest). For the
        serial console use ``guest.console.send(text)``."""
        self.type_text(text, delay)

    def get_screen_text(self) -> str:
        """NixOS's ``get_screen_text``: ``screen_text()``, the text on the display."""
        return self.screen_text()

    def copy_from_host(self, source: str | Path, target: str, timeout: float = 300) -> None:
        """NixOS's ``copy_from_host``: ``put`` for a file; a directory is copied whole,
        ``target`` becoming the copy."""
        self._commands.copy_from_host(source, target, timeout)
