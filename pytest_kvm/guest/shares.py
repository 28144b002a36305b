"""Mounting a guest's shared host folders (``share=``) once it answers SSH."""

from __future__ import annotations

from ..errors import GuestError
from ..share import SharedDir, mount_script
from ..util import tail_text
from .commands import Commands


def mount_shares(
    commands: Commands, shares: tuple[SharedDir, ...], rescan: bool, what: str, name: str
) -> None:
    """Mount ``shares`` at their guest paths (``rescan``: a restored clone, whose share
    devices its kernel has not seen yet); a GuestError with the guest's output if not."""
    result = commands.run(mount_script(shares, rescan), timeout=120)
    if result.exit_status != 0:
        folders = ", ".join(f"{share.source} -> {share.dest}" for share in shares)
        raise GuestError(
            f"{what}: mounting the shared folders ({folders}) failed "
            f"(exit {result.exit_status}): {tail_text(result.stderr or result.stdout)}",
            name,
        )
