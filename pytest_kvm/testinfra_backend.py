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

from .errors import KvmUnavailable

if TYPE_CHECKING:
    from .guest.commands import Commands

INSTALL_HINT = "pip install 'pytest-kvm[testinfra]'"  # the extra brings pytest-testinfra
# How long one testinfra command may run, in seconds (scaled like guest.run under TCG).
COMMAND_TIMEOUT = 300.0


class MissingTestinfra(KvmUnavailable, ImportError):
    """``guest.host`` needs pytest-testinfra, which is not installed."""


def make_host(what: str, target: str, commands: Commands) -> Any:
    """A ``testinfra.host.Host`` whose commands run through ``commands`` (a guest's
    command vocabulary: its SSH session, reopened after a reboot); ``what`` names the
    guest in messages, ``target`` is ``user@address:port``."""
    try:
        from testinfra.backend.paramiko import ParamikoBackend
        from testinfra.host import Host
    except ImportError as exc:
        raise MissingTestinfra(
            f"{what}: guest.host needs testinfra: {INSTALL_HINT} ({exc})"
        ) from None

    class GuestBackend(ParamikoBackend):  # type: ignore[misc]
        """testinfra's paramiko backend on the guest's connection (see module doc)."""

        NAME = "pytest-kvm"

        def __init__(self) -> None:
            self.command_timeout = COMMAND_TIMEOUT
            super().__init__(target)

        @property  # replaces testinfra's cached_property: never a connection of its own
        def client(self) -> paramiko.SSHClient:
            return commands.ssh_client()

        def run(self, command: str, *args: str, **kwargs: Any) -> Any:
            cmd = self.encode(self.get_command(command, *args))
            rc, stdout, stderr = commands.exec_bytes(cmd, self.command_timeout)
            return self.result(rc, cmd, stdout, stderr)

    return Host(GuestBackend())
