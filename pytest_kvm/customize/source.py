"""A disk for libguestfs: a file, maybe a LUKS-encrypted qcow2 chain."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..images import Image


@dataclass(frozen=True)
class DiskSource:
    """A disk for libguestfs: a file, maybe a LUKS-encrypted qcow2 chain."""

    path: Path
    format: str = "qcow2"
    encrypted: tuple[bool, ...] = ()
    secret: Path | None = None

    @classmethod
    def of(cls, image: Image) -> DiskSource:
        return cls(image.path, image.format, image.encrypted, image.secret)
