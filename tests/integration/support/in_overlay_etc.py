"""Run a command that sees its own /etc/qemu/bridge.conf: ``in_overlay_etc.py WORK ACL -- CMD``.

Meant to run under ``ip netns exec``, which gives it a private mount namespace
(mounts there never reach the host). /etc gets an overlay whose upper layer is
``WORK``; the host's /etc is the read-only lower layer and stays untouched.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from in_overlay import overlay  # run as a script: its directory is on sys.path


def main() -> None:
    work, acl, sep, *command = sys.argv[1:]
    if sep != "--" or not command:
        raise SystemExit("usage: in_overlay_etc.py WORK ACL -- COMMAND...")
    overlay("/etc", work)
    Path("/etc/qemu").mkdir(exist_ok=True)
    Path("/etc/qemu/bridge.conf").write_text(acl + "\n")
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
