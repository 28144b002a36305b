"""What one guest's parts share while it runs: its machine, console, directories,
SSH port and address, MAC, lease. Plain data plus the checks every part asks
("is it alive?", "what did the console say?"); it knows no part and no Guest."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..backends.base import Machine
from ..console import Console, tail
from ..lease import Lease
from ..tpm import Swtpm

PANIC = re.compile(r"Kernel panic - not syncing[^\n]*")


@dataclass
class GuestState:
    """One guest's running facts; ``what`` is how messages name it (``describe()``)."""

    name: str
    what: str
    timeout_scale: float
    mac: str
    # Where the test reaches the guest's SSH: the forward on 127.0.0.1 (user), or
    # the address the guest got by DHCP (bridge), learned once it has one.
    address: str
    workdir: Path | None = None
    sockdir: Path | None = None
    machine: Machine | None = None
    console: Console | None = None
    port: int = 0
    lease: Lease | None = None
    tpm: Swtpm | None = None  # the guest's swtpm, when this side runs it (tpm=True)
    boot_timings: dict[str, float] = field(default_factory=dict)

    @property
    def log_path(self) -> Path:
        assert self.console is not None
        return self.console.log_path

    def record(self, **fields: object) -> None:
        """What a reaper needs to end this guest if our process dies: in its lease."""
        if self.lease is not None:
            self.lease.update(**fields)

    def alive(self) -> str:
        """ "" while the guest may still answer; else what happened to it."""
        machine = self.machine
        if machine is None:
            return f"{self.what} was never started"
        panic = PANIC.search(tail(self.log_path, 60))
        if panic:
            return f"{self.what} panicked: {panic.group(0)}"
        if not machine.is_running():
            return f"{self.what}: QEMU exited (status {machine.exit_code()})"
        return ""

    def crash_lines(self, lines: int = 20) -> str:
        """The console lines that tell what happened: from just before a panic's first
        line (its cause, the faulting task, the call trace), else the last ``lines``."""
        text = tail(self.log_path, 80).splitlines()
        for index, line in enumerate(text):
            if PANIC.search(line):
                start = max(0, index - 3)
                return "\n".join(text[start : start + lines])
        return "\n".join(text[-lines:])

    def console_tail(self, lines: int = 20) -> str:
        return tail(self.log_path, lines)
