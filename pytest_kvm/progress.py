"""The progress lines of a long wait during a real boot: what the guest waits for,
the last thing its console said, and for how long."""

from __future__ import annotations

from pathlib import Path

from .util import tail

# A real boot that waits longer than this says what for, and again this often.
WAIT_PROGRESS_EVERY = 10.0


def last_console_line(path: Path, width: int = 60) -> str:
    """The last non-blank console line, without escape sequences, cut to ``width``."""
    for line in reversed(tail(path, 5).splitlines()):
        text = "".join(c if c.isprintable() else " " for c in line).strip()
        if text:
            return text if len(text) <= width else text[: width - 3] + "..."
    return ""


def waiting_line(name: str, what: str, console_log: Path, elapsed: float) -> str:
    """The progress line of a long wait during a real boot."""
    last = last_console_line(console_log)
    seen = f"console: {last}" if last else "console silent"
    return f"pytest-kvm: guest {name}: waiting for {what} ({seen}), {elapsed:.0f} s"
