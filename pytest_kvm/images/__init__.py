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
    # LUKS-encrypted qcow2: which layers of the backing chain are encrypted (top
    # first; all need the key), and the private file holding the secret.
    encrypted: tuple[bool, ...] = ()
    secret: Path | None = None
    # False: the image has no cloud-init, so the SSH key, host key, host name and
    # network go in with libguestfs instead of the NoCloud seed.
    cloud_init: bool = True

    def __str__(self) -> str:
        return self.name

    @property
    def is_encrypted(self) -> bool:
        return any(self.encrypted)

    def identity(self) -> dict[str, object]:
        """What identifies the image's content cheaply: path, size, mtime, inode.

        Catalog images also carry their recipe's digest in their file name."""
        st = self.path.stat()
        return {
            "name": self.name,
            "path": str(self.path.resolve()),
            "format": self.format,
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "inode": st.st_ino,
        }
