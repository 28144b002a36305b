"""A guest's own disk: its overlay's keys, the access written into an image without
cloud-init, the stopped guest's disk read through libguestfs (``guest.disk``), the
disk as a file (``disk_image``, fetched from a libvirt pool) and ``save_image``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..customize import Access, DiskHandle, DiskSource, GuestDisk, inject_access
from ..errors import GuestError, KvmConfigError
from ..images import Image
from ..images.overlay import flatten_image
from .state import GuestState


class Disk:
    """The overlay of one guest (``blank``: an installer's empty disk, plain)."""

    def __init__(self, state: GuestState, image: Image, *, blank: bool, force_tcg: bool) -> None:
        self._state = state
        self._image = image
        self._blank = blank
        self._force_tcg = force_tcg
        self.overlay: Path | None = None
        self.closed = False  # the guest is closed (or kept): no disk to read any more
        self._reader: GuestDisk | None = None
        self._fetched = False

    def keys(self) -> dict[str, Any]:
        """Drive arguments for this guest's overlay: the keys of an encrypted chain."""
        if not self._image.is_encrypted or self._blank:  # a blank disk is plain
            return {}
        return {"encrypted": (True, *self._image.encrypted), "secret": self._image.secret}

    def _source(self, overlay: Path) -> DiskSource:
        keys = self.keys()
        return DiskSource(overlay, "qcow2", keys.get("encrypted", ()), keys.get("secret"))

    def inject_access(self, overlay: Path, access: Access) -> None:
        """An image without cloud-init: write what the seed would have set up."""
        with DiskHandle(self._source(overlay), readonly=False, force_tcg=self._force_tcg,
                        what=f"the disk of {self._state.what}") as disk:  # fmt: skip
            inject_access(disk, access)

    def _running(self) -> bool:
        machine = self._state.machine
        return machine is not None and machine.is_running()

    @property
    def reader(self) -> GuestDisk:
        """See ``Guest.disk``."""
        if self.closed or self.overlay is None:
            raise GuestError(
                f"{self._state.what}: has no disk (not started, or closed)", self._state.name
            )
        if self._running():
            raise GuestError(
                f"{self._state.what}: guest.disk reads a stopped guest's disk; "
                "call guest.shutdown() or guest.kill() first",
                self._state.name,
            )
        if self._reader is None:
            self._reader = GuestDisk(self._source(self.fetch()), self._force_tcg,
                                     f"the disk of {self._state.what}")  # fmt: skip
        return self._reader

    def close_reader(self) -> None:
        if self._reader is not None:
            self._reader.close()

    def fetch(self) -> Path:
        """The stopped guest's disk as a local file: on libvirt the overlay lives in
        the pool and is downloaded once."""
        assert self.overlay is not None
        machine = self._state.machine
        if machine is not None and machine.disk_is_remote and not self._fetched:
            backing = None if self._blank else self._image.path
            machine.fetch_disk(self.overlay, backing)
            self._fetched = True
        return self.overlay

    def stopped(self, what: str) -> None:
        """GuestError unless the guest is stopped: ``what`` needs it so."""
        if self._running():
            raise GuestError(
                f"{self._state.what}: {what} needs it stopped; call wait_for_shutdown() "
                "or shutdown() first",
                self._state.name,
            )

    @property
    def image(self) -> Path:
        """See ``Guest.disk_image``."""
        if self.overlay is None or self.closed:
            raise GuestError(
                f"{self._state.what}: it has no disk (not started, or closed)", self._state.name
            )
        machine = self._state.machine
        if machine is not None and machine.disk_is_remote:
            self.stopped("disk_image")
        return self.fetch()

    def save_image(self, path: str | os.PathLike[str]) -> Path:
        """See ``Guest.save_image``."""
        self.stopped("save_image()")
        if self._image.is_encrypted and not self._blank:
            raise KvmConfigError(
                f"{self._state.what}: save_image() of an encrypted guest is not supported"
            )
        dest = Path(path)
        if dest.is_dir():
            raise KvmConfigError(f"save_image({str(path)!r}): that is a directory")
        if not dest.parent.is_dir():
            raise KvmConfigError(f"save_image({str(path)!r}): {str(dest.parent)!r} does not exist")
        return flatten_image(self.image, dest)
