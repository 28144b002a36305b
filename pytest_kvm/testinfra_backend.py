"""``guest.host``: a testinfra ``Host`` over the guest's own SSH connection.

testinfra's paramiko backend would open a connection of its own from an SSH config;
this one runs testinfra's commands over the guest's live paramiko client instead,
so they use the run's key and the guest's pinned host key, reconnect like
``guest.run`` after a reboot, and read stdout and stderr concurrently (bytes kept
as they are, for ``host.file(...).content``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import paramiko

from .errors import GuestTimeout, KvmUnavailable
from .ssh import CommandTimeout, run_command

if TYPE_CHECKING:
    from .guest import Guest

INSTALL_HINT = "pip install 'pytest-kvm[testinfra]'"  # the extra brings pytest-testinfra
# How long one testinfra command may run, in seconds (scaled like guest.run under TCG).
COMMAND_TIMEOUT = 300.0


class MissingTestinfra(KvmUnavailable, ImportError):
    """``guest.host`` needs pytest-testinfra, which is not installed."""


def make_host(guest: Guest) -> Any:
    """A ``testinfra.host.Host`` whose commands run on ``guest`` over ``guest.ssh``."""
    try:
        from testinfra.backend.paramiko import ParamikoBackend
        from testinfra.host import Host
    except ImportError as exc:
        raise MissingTestinfra(
            f"{guest.describe()}: guest.host needs testinfra: {INSTALL_HINT} ({exc})"
        ) from None

    class GuestBackend(ParamikoBackend):  # type: ignore[misc]
        """testinfra's paramiko backend on the guest's connection (see module doc)."""

        NAME = "pytest-kvm"

        def __init__(self, guest: Guest) -> None:
            self.guest = guest
            self.command_timeout = COMMAND_TIMEOUT
            super().__init__(f"{guest.config.user}@{guest.address}:{guest.ssh_port}")

        @property  # replaces testinfra's cached_property: never a connection of its own
        def client(self) -> paramiko.SSHClient:
            return self.guest.ssh

        def run(self, command: str, *args: str, **kwargs: Any) -> Any:
            cmd = self.encode(self.get_command(command, *args))
            rc, stdout, stderr = self._exec_command(cmd)
            return self.result(rc, cmd, stdout, stderr)

        def _exec_command(self, command: bytes) -> tuple[int, bytes, bytes]:
            transport = self.client.get_transport()
            if transport is None or not transport.is_active():
                self.guest.reconnect()  # a reboot or sshd restart closed it
                transport = self.client.get_transport()
                assert transport is not None
            limit = self.command_timeout * self.guest.timeout_scale
            return _exec(transport, command, limit, self.guest)

    return Host(GuestBackend(guest))


def _exec(
    transport: paramiko.Transport, command: bytes, limit: float, guest: Guest
) -> tuple[int, bytes, bytes]:
    try:
        return run_command(transport, command, limit)
    except CommandTimeout:
        raise GuestTimeout(
            f"{guest.describe()}: testinfra command {command.decode(errors='replace')!r} "
            f"did not finish within {limit:.0f} s",
            guest,
        ) from None
    except ConnectionResetError:
        raise ConnectionResetError(
            f"{guest.describe()}: the SSH connection was lost while "
            f"{command.decode(errors='replace')!r} ran (no exit status)"
        ) from None
