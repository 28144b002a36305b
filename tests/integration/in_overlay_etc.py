"""Run a command that sees its own /etc/qemu/bridge.conf: ``in_overlay_etc.py WORK ACL -- CMD``.

Meant to run under ``ip netns exec``, which gives it a private mount namespace
(mounts there never reach the host). /etc gets an overlay whose upper layer is
``WORK``; the host's /etc is the read-only lower layer and stays untouched.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def main() -> None:
    work, acl, sep, *command = sys.argv[1:]
    if sep != "--" or not command:
        raise SystemExit("usage: in_overlay_etc.py WORK ACL -- COMMAND...")
    upper, scratch = Path(work) / "upper", Path(work) / "work"
    upper.mkdir(parents=True, exist_ok=True)
    scratch.mkdir(parents=True, exist_ok=True)
    # Only this mount namespace: make sure nothing propagates back to the host.
    subprocess.run(["mount", "--make-rprivate", "/"], check=True)
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o",
         f"lowerdir=/etc,upperdir={upper},workdir={scratch}", "/etc"],
        check=True,
    )  # fmt: skip
    Path("/etc/qemu").mkdir(exist_ok=True)
    Path("/etc/qemu/bridge.conf").write_text(acl + "\n")
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
