"""The exception hierarchy of DESIGN.md's contract."""

from __future__ import annotations


class KvmError(Exception):
    """Base of every pytest-kvm error."""


class KvmConfigError(KvmError):
    """A bad option, ini value, environment variable or marker argument."""


class KvmUnavailable(KvmError):
    """Something needed is not installed or not available: the test skips."""


class ImageError(KvmError):
    """An image is missing, corrupt, of the wrong format or fails its checksum."""


class HostDiskFull(KvmError):
    """Too little free space on the host for a guest's disk, a blank disk or a template:
    raised before QEMU starts; the message names the directory, its free and the
    needed MiB."""


class GuestError(KvmError):
    """Something went wrong with one guest; ``.guest`` names it (the guest's name, or
    None where no guest is known yet)."""

    def __init__(self, message: str, guest: str | None = None) -> None:
        super().__init__(message)
        self.guest = guest


class GuestLaunchError(GuestError):
    """QEMU could not be started or died during boot."""

    def __init__(
        self,
        message: str,
        guest: str | None = None,
        *,
        argv: list[str] | None = None,
        exit_code: int | None = None,
        console_tail: str = "",
    ) -> None:
        super().__init__(message, guest)
        self.argv = argv or []
        self.exit_code = exit_code
        self.console_tail = console_tail


class GuestCrashed(GuestError):
    """The guest died or panicked during the test."""

    def __init__(self, message: str, guest: str | None = None) -> None:
        super().__init__(message, guest)
        if guest is not None:
            _crashes_told.add(guest)


# Guests whose crash a GuestCrashed already told the test about (guest names are unique
# in a run): the error gate does not fail a test again for a panic it was shown.
_crashes_told: set[str] = set()


def crash_told(guest: str) -> bool:
    """Whether a ``GuestCrashed`` was raised for the guest named ``guest``."""
    return guest in _crashes_told


class GuestTimeout(GuestError, TimeoutError):
    """A wait ran out; the message says what it last saw."""


class CommandFailed(GuestError):
    """A command in the guest exited non-zero (or zero, for ``fail``)."""

    def __init__(
        self,
        message: str,
        guest: str | None = None,
        *,
        command: str = "",
        exit_status: int | None = None,
        stdout: str = "",
        stderr: str = "",
    ) -> None:
        super().__init__(message, guest)
        self.command = command
        self.exit_status = exit_status
        self.stdout = stdout
        self.stderr = stderr


class SnapshotFailed(GuestError):
    """A prepared snapshot's ``setup`` failed (``kvm_snapshot``): nothing was cached.
    The message names the snapshot and carries the command's output (when a command
    failed) and the console tail; ``.snapshot`` is its name, ``.console_tail`` the tail."""

    def __init__(
        self, message: str, guest: str | None = None, *, snapshot: str = "", console_tail: str = ""
    ) -> None:
        super().__init__(message, guest)
        self.snapshot = snapshot
        self.console_tail = console_tail
