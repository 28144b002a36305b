"""Host commands of an image build: run one and keep its output's tail for the
error, stream a long one's output as progress, stop one on an interrupt, and
remove the work directory without crossing into a mount left in it.
"""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import shlex
import shutil
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import ImageError
from ..util import tail_text

Progress = Callable[[str], None]

_TAIL_LINES = 40
_CHATTER_INTERVAL = 2.0  # seconds between forwarded apt/dpkg lines
_QUIET_INTERVAL = 10.0  # a "still running" line after this long without output


def run_command(
    argv: Sequence[str], *, name: str, env: dict[str, str], input: bytes | None = None
) -> str:
    """Run ``argv`` for the build of image ``name``; its output, or ImageError with its tail."""
    try:
        done = subprocess.run(
            list(argv),
            input=input,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            check=False,
        )
    except OSError as exc:
        raise ImageError(f"building {name!r}: cannot run {argv[0]}: {exc}") from exc
    output = done.stdout.decode(errors="replace")
    if done.returncode != 0:
        raise ImageError(
            f"building {name!r}: {shlex.join(argv)} failed "
            f"(exit {done.returncode}):\n{tail_text(output, _TAIL_LINES)}"
        )
    return output


def stream_command(
    argv: Sequence[str], prefix: str, *, name: str, env: dict[str, str], progress: Progress
) -> None:
    """Run ``argv``, passing its output to ``progress`` as it comes.

    mmdebstrap's own lines (``I:``, ``W:``, ``E:``) all pass; the flood of
    apt and dpkg lines that ``--verbose`` adds is thinned to one every
    couple of seconds, and a quiet stretch (extracting archives) gets a
    "still running" line, so the user never stares at silence for long.
    """
    tail: deque[str] = deque(maxlen=_TAIL_LINES)
    try:
        proc = subprocess.Popen(
            list(argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    except OSError as exc:
        raise ImageError(f"building {name!r}: cannot run {argv[0]}: {exc}") from exc
    assert proc.stdout is not None
    started = last_shown = time.monotonic()
    last_chatter = started - _CHATTER_INTERVAL
    last_info = ""
    pending = b""
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            while True:
                ready = selector.select(timeout=1.0)
                now = time.monotonic()
                chunk = os.read(proc.stdout.fileno(), 65536) if ready else None
                if chunk == b"":
                    break
                if chunk is None:
                    if now - last_shown >= _QUIET_INTERVAL:
                        last_shown = now
                        progress(
                            f"{prefix}... still running ({now - started:.0f}s)"
                            + (f", last: {last_info}" if last_info else "")
                        )
                    continue
                pending += chunk.replace(b"\r", b"\n")
                *lines, pending = pending.split(b"\n")
                for raw in lines:
                    line = raw.decode(errors="replace").rstrip()
                    if not line:
                        continue
                    tail.append(line)
                    if line[:2] in ("I:", "W:", "E:"):
                        last_info = line
                    elif now - last_chatter < _CHATTER_INTERVAL:
                        continue
                    else:
                        last_chatter = now
                    last_shown = now
                    progress(f"{prefix}{line}")
        if pending.strip():
            tail.append(pending.decode(errors="replace").rstrip())
        returncode = proc.wait()
    except BaseException:
        stop_process(proc)
        raise
    finally:
        proc.stdout.close()
    if returncode != 0:
        raise ImageError(
            f"building {name!r}: {shlex.join(argv)} failed (exit {returncode}):\n" + "\n".join(tail)
        )


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """Interrupt a child (it got our SIGINT already, if from a terminal) and reap it."""
    for sig, wait in ((signal.SIGINT, 60.0), (signal.SIGTERM, 15.0), (signal.SIGKILL, 15.0)):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def mounts_under(path: Path) -> list[str]:
    prefix = str(path).rstrip("/") + "/"
    found: list[str] = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4:
                    point = re.sub(r"\\(\d{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
                    if point == str(path) or point.startswith(prefix):
                        found.append(point)
    except OSError:
        pass
    return found


def unmount_under(path: Path) -> None:
    """Unmount what a killed mmdebstrap or debootstrap left mounted in ``path``
    (its /dev, /proc, /sys), deepest first."""
    for point in sorted(mounts_under(path), key=len, reverse=True):
        subprocess.run(["umount", "--lazy", point], check=False, capture_output=True)


def remove_tree(path: Path, progress: Progress) -> None:
    """Remove the work directory, never crossing into something mounted in it."""
    if not path.exists():
        return
    unmount_under(path)
    left = mounts_under(path)
    if left:
        progress(f"not removing {path}: still mounted there: {', '.join(left)}")
        return
    shutil.rmtree(path, ignore_errors=True)
