"""Run a command that sees ``DIR`` through an overlay: ``in_overlay.py DIR WORK -- CMD``.

Meant to run under ``ip netns exec``, which gives it a private mount namespace
(mounts there never reach the host). ``DIR`` gets an overlay whose upper layer is
``WORK/upper``: files put there beforehand appear in ``DIR``, and whatever the
command writes into ``DIR`` lands there too; the real ``DIR`` stays untouched.
The remote-libvirt tests give /root a ``.ssh`` of their own this way.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def overlay(target: str, work: str) -> None:
    """Mount an overlay on ``target`` with ``work/upper`` as its upper layer, in this
    (private) mount namespace only."""
    upper, scratch = Path(work) / "upper", Path(work) / "work"
    upper.mkdir(parents=True, exist_ok=True)
    scratch.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--make-rprivate", "/"], check=True)
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o",
         f"lowerdir={target},upperdir={upper},workdir={scratch}", target],
        check=True,
    )  # fmt: skip


def main() -> None:
    target, work, sep, *command = sys.argv[1:]
    if sep != "--" or not command:
        raise SystemExit("usage: in_overlay.py DIR WORK -- COMMAND...")
    overlay(target, work)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
