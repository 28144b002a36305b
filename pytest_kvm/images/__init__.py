"""Images: catalog recipes, the cache, local builds, validation and overlays."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Image:
    """A base image guests start from; it is never written."""

    name: str  # what test ids show: "debian-12", "my-appliance"
    path: Path
    format: str  # "qcow2" | "raw"
    source: str  # what the user gave: a path, a URL or a catalog name
    virtual_size: int = 0

    def __str__(self) -> str:
        return self.name
