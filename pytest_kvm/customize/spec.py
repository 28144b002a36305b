"""What to change in a disk before it boots: files, a host name, commands (validated
user input, and the digest that keys its cached layer)."""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import KvmConfigError

_MODE_MAX = 0o7777


_HOSTNAME = re.compile(
    r"^(?=.{1,63}$)[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*$"
)


def check_hostname(hostname: object, where: str = "") -> None:
    if not isinstance(hostname, str) or not _HOSTNAME.match(hostname):
        raise KvmConfigError(
            f"{where + ': ' if where else ''}hostname={hostname!r} is not a host name "
            "(letters, digits and '-', dot-separated labels, at most 63 characters)"
        )


@dataclass(frozen=True)
class FileSpec:
    path: str  # absolute, in the guest
    content: bytes
    mode: int = 0o644


@dataclass(frozen=True)
class Customization:
    """Files, a host name and commands applied to a disk before it boots, in that order."""

    files: tuple[FileSpec, ...] = ()
    hostname: str | None = None
    run: tuple[str, ...] = ()

    @classmethod
    def build(
        cls,
        files: Mapping[str, Any] | None = None,
        hostname: str | None = None,
        run: str | Sequence[str] | None = None,
        where: str = "customize",
    ) -> Customization:
        """Validate user input: ``files`` maps guest paths to text, bytes, a local
        ``Path`` to copy, or ``(content, mode)``; ``run`` is one command or several."""
        specs: list[FileSpec] = []
        if files is not None:
            if not isinstance(files, Mapping):
                raise KvmConfigError(f"{where}: files= must map guest paths to contents")
            for guest_path, value in files.items():
                specs.append(_file_spec(guest_path, value, where))
        if hostname is not None:
            check_hostname(hostname, where)
        commands: tuple[str, ...] = ()
        if run is not None:
            if not isinstance(run, str | Sequence):
                raise KvmConfigError(
                    f"{where}: run= takes a shell command string or a list of them, "
                    f"not {type(run).__name__}"
                )
            commands = (run,) if isinstance(run, str) else tuple(run)
            for command in commands:
                if not isinstance(command, str) or not command.strip() or "\0" in command:
                    raise KvmConfigError(
                        f"{where}: run= takes shell command strings; {command!r} is not one"
                    )
        return cls(tuple(sorted(specs, key=lambda f: f.path)), hostname, commands)

    def __bool__(self) -> bool:
        return bool(self.files or self.hostname or self.run)

    def merged(self, other: Customization) -> Customization:
        """``other`` on top of this: its files replace ours, its commands run after."""
        files = {f.path: f for f in self.files}
        files.update({f.path: f for f in other.files})
        return Customization(
            tuple(sorted(files.values(), key=lambda f: f.path)),
            other.hostname or self.hostname,
            self.run + other.run,
        )

    def digest(self) -> str:
        doc = {
            "files": [[f.path, hashlib.sha256(f.content).hexdigest(), f.mode] for f in self.files],
            "hostname": self.hostname,
            "run": list(self.run),
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    def summary(self) -> str:
        parts = []
        if self.files:
            parts.append(f"{len(self.files)} file{'s' if len(self.files) != 1 else ''}")
        if self.hostname:
            parts.append(f"hostname {self.hostname}")
        if self.run:
            parts.append(f"{len(self.run)} command{'s' if len(self.run) != 1 else ''}")
        return ", ".join(parts) or "nothing"


def _file_spec(guest_path: object, value: Any, where: str) -> FileSpec:
    if not isinstance(guest_path, str) or not guest_path.startswith("/") or "\0" in guest_path:
        raise KvmConfigError(f"{where}: files= key {guest_path!r} is not an absolute guest path")
    norm = posixpath.normpath(guest_path)
    if norm != guest_path or norm == "/":
        raise KvmConfigError(
            f"{where}: files= key {guest_path!r} is not a plain path to a file "
            "(no '..', '.', '//' or trailing '/')"
        )
    mode: int | None = None
    content = value
    if isinstance(value, tuple):
        if len(value) != 2 or not isinstance(value[1], int) or isinstance(value[1], bool):
            raise KvmConfigError(f"{where}: files[{guest_path!r}]: use (content, mode)")
        content, mode = value
        if not 0 <= mode <= _MODE_MAX:
            raise KvmConfigError(f"{where}: files[{guest_path!r}]: mode {mode:o} is not a mode")
    if isinstance(content, str):
        data = content.encode()
    elif isinstance(content, bytes | bytearray):
        data = bytes(content)
    elif isinstance(content, os.PathLike):
        local = Path(content)
        if not local.is_file():
            raise KvmConfigError(
                f"{where}: files[{guest_path!r}]: local file {str(local)!r} does not exist"
            )
        data = local.read_bytes()
        if mode is None:
            mode = 0o755 if local.stat().st_mode & 0o111 else 0o644
    else:
        raise KvmConfigError(
            f"{where}: files[{guest_path!r}]: give text, bytes, a pathlib.Path or "
            f"(content, mode), not {type(content).__name__}"
        )
    return FileSpec(norm, data, 0o644 if mode is None else mode)
