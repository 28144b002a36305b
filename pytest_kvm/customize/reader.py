"""A stopped guest's disk, opened read-only: files and the systemd journal of its last
boot."""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Callable, Mapping
from typing import Any

from .handle import CALL_LIMIT, DiskHandle
from .source import DiskSource

JOURNAL_DIR = "/var/log/journal"


class GuestDisk:
    """A stopped guest's disk, read-only. The appliance starts at the first call and
    serves every later one; ``close()`` (the guest's close does it) stops it."""

    def __init__(self, source: DiskSource, force_tcg: bool, what: str) -> None:
        self._handle = DiskHandle(source, readonly=True, force_tcg=force_tcg, what=what)

    @property
    def _g(self) -> Any:
        if self._handle.g is None:
            self._handle.open()
        return self._handle.g

    def read_bytes(self, path: str) -> bytes:
        return bytes(self._call(lambda g: g.read_file(path), path))

    def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return self.read_bytes(path).decode(encoding, errors="replace")

    def ls(self, path: str) -> list[str]:
        return sorted(self._call(lambda g: g.ls(path), path))

    def exists(self, path: str) -> bool:
        return bool(self._call(lambda g: g.exists(path), path))

    def _call(self, action: Callable[[Any], Any], path: str) -> Any:
        g = self._g  # the appliance starts at the first call
        try:
            with self._handle.bounded(CALL_LIMIT, f"reading {path}"):
                return action(g)
        except RuntimeError as exc:
            raise FileNotFoundError(f"{self._handle.what}: {path}: {exc}") from None

    def journal(self) -> str:
        """The systemd journal of the guest's last boot, as ``journalctl -o short`` lines.

        Needs a persistent journal (``/var/log/journal``); what the guest had not
        written to its disk when it stopped is not there."""
        return "\n".join(self.journal_entries()) + "\n"

    def journal_entries(self) -> list[str]:
        g = self._g
        if not g.is_dir(JOURNAL_DIR):
            raise FileNotFoundError(
                f"{self._handle.what}: no persistent journal ({JOURNAL_DIR} is missing)"
            )
        entries: list[tuple[str, int, str]] = []
        with self._handle.bounded(CALL_LIMIT, "reading its journal"):
            g.journal_open(JOURNAL_DIR)
            try:
                g.journal_set_data_threshold(4096)
                while g.journal_next():
                    fields = {f["attrname"]: f["attrval"] for f in g.journal_get()}
                    usec = g.journal_get_realtime_usec()
                    entries.append(
                        (_text(fields.get("_BOOT_ID")), usec, _format_entry(fields, usec))
                    )
            finally:
                with contextlib.suppress(RuntimeError):  # not after the appliance is gone
                    g.journal_close()
        if not entries:
            return []
        last_boot = max(entries, key=lambda e: e[1])[0]
        return [line for boot, _, line in sorted(entries, key=lambda e: e[1]) if boot == last_boot]

    def close(self) -> None:
        self._handle.close()


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _format_entry(fields: Mapping[str, bytes | str], usec: int) -> str:
    stamp = datetime.datetime.fromtimestamp(usec / 1e6, tz=datetime.UTC).strftime("%b %d %H:%M:%S")
    ident = _text(fields.get("SYSLOG_IDENTIFIER")) or _text(fields.get("_COMM")) or "?"
    pid = _text(fields.get("_PID"))
    host = _text(fields.get("_HOSTNAME"))
    message = _text(fields.get("MESSAGE"))
    return f"{stamp} {host} {ident}{f'[{pid}]' if pid else ''}: {message}"
