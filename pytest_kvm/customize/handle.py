"""A libguestfs appliance on one disk, its file systems mounted.

A libguestfs handle runs a small appliance VM; it takes its drives before it is
launched and none after, so one handle serves one disk. Under TCG it is forced to TCG
(``force_tcg``): its own KVM probe is wrong on these hosts and it would hang for
minutes. Encrypted chains go through :mod:`.nbd`."""

from __future__ import annotations

import contextlib
import os
import posixpath
import signal
import threading
import time
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from ..errors import ImageError, KvmUnavailable
from .nbd import _NbdExport
from .source import DiskSource
from .spec import Customization

GUESTFS_PACKAGE = "python3-guestfs"
#: How long one libguestfs step (inspecting the disk, reading a journal) may take
#: before its appliance is stopped. libguestfs waits for its daemon for ever, and an
#: appliance was seen idle for 16 minutes in inspect_os() under TCG, on the disk of
#: a guest that had panicked: the artifacts of that test held the whole run.
CALL_LIMIT = 300.0


def load_guestfs(why: str = "this") -> ModuleType:
    """The guestfs module, or KvmUnavailable naming the package to install."""
    try:
        import guestfs  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise KvmUnavailable(
            f"libguestfs is not installed, and {why} needs it (Debian package: {GUESTFS_PACKAGE})"
        ) from None
    return guestfs  # type: ignore[no-any-return,unused-ignore]


def guestfs_available() -> bool:
    try:
        load_guestfs()
    except KvmUnavailable:
        return False
    return True


class DiskHandle:
    """A launched libguestfs appliance on one disk, with the guest's file systems
    mounted at ``/``. The constructor records; ``open()`` launches; ``close()`` is
    idempotent and, for a writable disk, flushes everything to it."""

    def __init__(
        self, source: DiskSource, *, readonly: bool, force_tcg: bool, what: str = ""
    ) -> None:
        self.source = source
        self.readonly = readonly
        self.force_tcg = force_tcg
        self.what = what or str(source.path)
        self.g: Any = None
        self._nbd: _NbdExport | None = None
        self.launch_seconds = 0.0

    def open(self) -> DiskHandle:
        guestfs = load_guestfs("reading or changing disks offline")
        t0 = time.monotonic()
        try:
            g = guestfs.GuestFS(python_return_dict=True, close_on_exit=False)
            self.g = g
            g.set_backend("direct")
            if self.force_tcg:
                g.set_backend_settings(["force_tcg"])
            if any(self.source.encrypted):
                if self.source.secret is None:
                    raise ImageError(f"{self.what} is encrypted and no secret was given")
                self._nbd = _NbdExport(self.source, self.readonly)
                self._nbd.start()
                g.add_drive_opts(
                    "", format="raw", protocol="nbd", server=[f"unix:{self._nbd.socket}"],
                    readonly=self.readonly,
                )  # fmt: skip
            else:
                g.add_drive_opts(str(self.source.path), format=self.source.format,
                                 readonly=self.readonly)  # fmt: skip
            g.launch()
            with self.bounded(CALL_LIMIT, "inspecting its file systems"):
                self._mount()
        except RuntimeError as exc:  # what the binding raises for libguestfs errors
            self.close()
            raise ImageError(f"libguestfs could not open {self.what}: {exc}") from None
        except BaseException:
            self.close()
            raise
        self.launch_seconds = time.monotonic() - t0
        return self

    @contextlib.contextmanager
    def bounded(self, seconds: float, doing: str) -> Iterator[None]:
        """Run the block's libguestfs calls, stopping the appliance (its QEMU, by
        PID) if they take longer than ``seconds``: the call then fails, and so does
        the handle, with an ImageError saying so."""
        pid = int(self.g.get_pid())
        fired = threading.Event()

        def stop() -> None:
            fired.set()
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

        timer = threading.Timer(seconds, stop)
        timer.daemon = True
        timer.start()
        try:
            yield
        except RuntimeError:
            if not fired.is_set():
                raise
            raise ImageError(
                f"{self.what}: libguestfs did not answer within {seconds:.0f} s "
                f"({doing}); its appliance was stopped"
            ) from None
        finally:
            timer.cancel()

    def _mount(self) -> None:
        g = self.g
        roots = g.inspect_os()
        if not roots:
            raise ImageError(f"{self.what}: libguestfs found no operating system on it")
        mountpoints = g.inspect_get_mountpoints(roots[0])
        for mountpoint in sorted(mountpoints, key=len):
            device = mountpoints[mountpoint]
            with contextlib.suppress(RuntimeError):  # e.g. a swap entry or a gone device
                if self.readonly:
                    g.mount_ro(device, mountpoint)
                else:
                    g.mount(device, mountpoint)

    def close(self) -> None:
        g, self.g = self.g, None
        try:
            if g is not None:
                with contextlib.suppress(RuntimeError):
                    if not self.readonly:
                        g.umount_all()
                    g.shutdown()  # waits for the appliance: the disk is complete after it
                g.close()
        finally:
            if self._nbd is not None:
                self._nbd.close()
                self._nbd = None

    def __enter__(self) -> DiskHandle:
        return self.open() if self.g is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- changes ---------------------------------------------------------------------

    def write_file(self, path: str, content: bytes, mode: int, dir_mode: int = 0o755) -> None:
        g = self.g
        parent = posixpath.dirname(path)
        if not g.is_dir(parent):
            g.mkdir_p(parent)
            g.chmod(dir_mode, parent)
        g.write(path, content)
        g.chmod(mode, path)

    def apply(self, custom: Customization) -> None:
        g = self.g
        for spec in custom.files:
            try:
                self.write_file(spec.path, spec.content, spec.mode)
            except RuntimeError as exc:
                raise ImageError(f"{self.what}: cannot write {spec.path}: {exc}") from None
        if custom.hostname:
            self.set_hostname(custom.hostname)
        for number, command in enumerate(custom.run):
            try:
                g.sh(command)
            except RuntimeError as exc:
                raise ImageError(
                    f"{self.what}: run[{number}] {command!r} failed in the image: {exc}"
                ) from None

    def set_hostname(self, hostname: str) -> None:
        g = self.g
        g.write("/etc/hostname", hostname.encode() + b"\n")
        if g.is_file("/etc/hosts"):
            lines = g.read_file("/etc/hosts").decode(errors="replace").splitlines()
            kept = [line for line in lines if not line.startswith("127.0.1.1")]
            g.write("/etc/hosts", ("\n".join([*kept, f"127.0.1.1\t{hostname}"]) + "\n").encode())
