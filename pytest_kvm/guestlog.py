"""What the error gate (``--kvm-fail-on``) reads in a guest after a test's call: where
the test's part of the guest's logs begins (``HandOver``), a new kernel panic on the
console, and one guest command that reads the journal since then; which of its
entries are oopses, core dumps or errors, and which ``kvm_allow`` patterns excuse."""

from __future__ import annotations

import json
import math
import re
import secrets
import shlex
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import crash_told
from .guest import Guest
from .guest.state import PANIC

# Seconds before the hand-over that still count, beyond what the clock comparison in
# ``check`` allows for already (the guest's answer's way back to the host).
SLACK = 0.2
MAX_ENTRIES = 5000  # the newest entries a gate reads: a chatty test stays cheap
MAX_CONSOLE = 4 << 20  # bytes of console the panic check reads at most
EVIDENCE_LINES = 20  # per guest in a report
HANDOVER_TAG = "pytest-kvm-handover"  # the journal entry a test's part begins after
HANDOVER_POLLS = 300  # tenths of a second a hand-over waits for its entry, at most
FIELDS = "MESSAGE,PRIORITY,SYSLOG_FACILITY,SYSLOG_IDENTIFIER,_TRANSPORT,_PID,_COMM,MESSAGE_ID"
COREDUMP_MESSAGE_ID = "fc2e22bc6ee647b6b90729ab34a250b1"  # systemd-coredump's "dumped core"

# Kernel messages (facility kern, transport kernel) that say the kernel hit a bug.
OOPS = re.compile(
    r"^(?:Oops\b|kernel BUG at |WARNING: CPU: ?\d+ PID: ?\d+ at |general protection fault"
    r"|Unable to handle kernel |UBSAN: |KASAN: |INFO: task \S+ blocked for more than "
    r"|rcu: INFO: \S+ detected (?:expedited )?stalls)|\bBUG: "
)
# Kernel messages about a user process that faulted (printed for real faults only).
COREDUMP_KERNEL = re.compile(r"\bsegfault at [0-9a-f]+ ip |^traps: \S+\[\d+\] ")
# systemd's (and systemd-coredump's) messages about a process killed by a core signal.
COREDUMP_USER = re.compile(
    r"\bcode=dumped\b|\bcode=killed, status=\d+/(?:SEGV|BUS|ILL|FPE|ABRT|TRAP|SYS|QUIT)\b"
    r"|Failed with result 'core-dump'|\bdumped core\b"
)
ERR = 3  # syslog priority err: journal-err fails on this and worse (0..3)


@dataclass(frozen=True)
class HandOver:
    """When a guest was handed to the test: the host's clock, the console's length and,
    when the journal is to be read, the journal's cursor then."""

    time: float
    console: int
    cursor: str = ""

    @classmethod
    def now(cls, guest: Guest, kinds: frozenset[str] = frozenset()) -> HandOver:
        try:
            size = guest.serial_log.stat().st_size
        except (OSError, AssertionError):  # no console yet: everything on it is new
            size = 0
        at = time.time()
        cursor = ""
        if kinds - {"panic"}:  # one guest command, only when the journal will be read
            result = guest.run_if_answering(handover_command(secrets.token_hex(8)), 60)
            for line in (result.stdout if result else "").splitlines():
                if line.startswith("-- cursor: "):
                    cursor = line.removeprefix("-- cursor: ").strip()
        return cls(at, size, cursor)


def handover_command(token: str) -> str:
    """The guest command that marks the hand-over in the journal and prints that
    entry's cursor. It waits for the entry to be written: a restored clone's journald
    is restarting then (its new machine-id), and a cursor taken in the old journald's
    file was, in some runs, one the gate's read after it did not find the test's
    entries behind. The marker is sent to the socket, which systemd holds while
    journald restarts, so the new journald writes it (notice priority: no finding).
    Without journalctl or logger (a guest without systemd) it fails at once: no
    cursor, and ``check`` reads the journal by time, if there is one."""
    tag = shlex.quote(HANDOVER_TAG)
    return (
        "command -v journalctl >/dev/null && command -v logger >/dev/null || exit 1; "
        f"logger -t {tag} {shlex.quote(token)}; i=0; "
        f"while [ $i -lt {HANDOVER_POLLS} ]; do "
        f"c=$(journalctl -q -n 1 -o cat --show-cursor -t {tag} 2>/dev/null) || true; "
        f'case "$c" in *{shlex.quote(token)}*) echo "$c"; exit 0;; esac; '
        "sleep 0.1; i=$((i + 1)); done; exit 1"
    )


@dataclass(frozen=True)
class Finding:
    """One line of evidence: the kind it fails under, the line as shown, its message."""

    kind: str
    line: str
    message: str = ""

    def excused(self, allow: Sequence[re.Pattern[str]]) -> bool:
        return any(p.search(self.line) or p.search(self.message) for p in allow)


@dataclass
class Verdict:
    """What the gate found in one guest, and what it could not look at (``note``)."""

    findings: list[Finding]
    note: str = ""


def journal_command(elapsed: float, cursor: str = "") -> str:
    """The one guest command: journald writes out what it was sent (``--sync``: a
    message logged just before the test ended is not missed), then the journal entries
    (JSON, one a line, priority info or worse) after the hand-over's ``cursor``; with
    no cursor, those of the last ``elapsed`` seconds (and some), and last the guest's
    clock, read as late as can be (see ``check``)."""
    head = (
        "journalctl --sync 2>/dev/null; "
        f"journalctl -q --no-pager -o json -p info -n {MAX_ENTRIES} --output-fields={FIELDS} "
    )
    if cursor:
        return head + f"--after-cursor={shlex.quote(cursor)}"
    back = math.ceil(elapsed + SLACK) + 2
    return (
        head + f"--since=-{back}s; "
        # bash's clock costs no process (one is ~0.2 s under TCG); other shells run date.
        't="${EPOCHREALTIME:-}"; [ -n "$t" ] || t=$(date +%s.%N); echo "$t"'
    )


def _text(value: Any) -> str:
    if isinstance(value, list):  # journald's JSON gives non-UTF-8 messages as bytes
        return bytes(v for v in value if isinstance(v, int) and 0 <= v < 256).decode(
            "utf-8", "replace"
        )
    return "" if value is None else str(value)


def parse_entries(lines: Iterable[str], since_us: int) -> list[dict[str, str]]:
    """The JSON entries whose receive time (guest clock, µs) is ``since_us`` or later."""
    entries = []
    for line in lines:
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            raw = json.loads(line)
            stamp = int(raw.get("__REALTIME_TIMESTAMP", 0))
        except (ValueError, TypeError, AttributeError):
            continue
        if stamp >= since_us:
            entries.append({key: _text(value) for key, value in raw.items()})
    return entries


def _shown(entry: dict[str, str]) -> str:
    """An entry as ``journalctl -o short`` names it: ``ident[pid]: message``."""
    ident = entry.get("SYSLOG_IDENTIFIER") or entry.get("_COMM") or "?"
    pid = entry.get("_PID", "")
    if entry.get("_TRANSPORT") == "kernel" and ident == "kernel":
        pid = ""
    return f"{ident}[{pid}]: {entry.get('MESSAGE', '')}" if pid else (
        f"{ident}: {entry.get('MESSAGE', '')}"
    )  # fmt: skip


def classify(entry: dict[str, str], kinds: frozenset[str]) -> str:
    """The kind (of ``kinds``) one journal entry fails under, or "". A kernel message is
    one the kernel logged (transport kernel, facility kern): lines userspace writes to
    /dev/kmsg have facility user and are never taken for an oops."""
    message = entry.get("MESSAGE", "")
    kernel = entry.get("_TRANSPORT") == "kernel" and entry.get("SYSLOG_FACILITY", "0") == "0"
    if "oops" in kinds and kernel and OOPS.search(message):
        return "oops"
    if "coredump" in kinds and (
        (kernel and COREDUMP_KERNEL.search(message))
        or (not kernel and COREDUMP_USER.search(message))
        or entry.get("MESSAGE_ID") == COREDUMP_MESSAGE_ID
    ):
        return "coredump"
    if "journal-err" in kinds:
        try:
            if int(entry.get("PRIORITY", "6")) <= ERR:
                return "journal-err"
        except ValueError:
            pass
    return ""


def journal_findings(entries: Iterable[dict[str, str]], kinds: frozenset[str]) -> list[Finding]:
    findings = []
    for entry in entries:
        kind = classify(entry, kinds)
        if kind:
            findings.append(Finding(kind, _shown(entry), entry.get("MESSAGE", "")))
    return findings


def console_panic(text: str) -> Finding | None:
    """A kernel panic in ``text`` (console output since the hand-over), with the three
    lines before it (what caused it)."""
    lines = text.splitlines()
    for index, line in enumerate(lines):
        match = PANIC.search(line)
        if match:
            context = [x.rstrip() for x in lines[max(0, index - 3) : index + 1]]
            return Finding("panic", "\n".join(context), match.group(0))
    return None


def _new_console(guest: Guest, handover: HandOver) -> str:
    try:
        with guest.serial_log.open("rb") as log:
            size = log.seek(0, 2)
            log.seek(max(handover.console, size - MAX_CONSOLE))
            return log.read().decode("utf-8", "replace")
    except (OSError, AssertionError):
        return ""


def check(guest: Guest, handover: HandOver, kinds: frozenset[str], timeout: float = 30) -> Verdict:
    """What ``guest`` logged since ``handover`` that fails under ``kinds``. A guest that
    is gone or does not answer is no finding (the note says so): what ended it is
    reported elsewhere; a panic a ``GuestCrashed`` told the test about is none either."""
    if not kinds or guest.machine is None or not guest.is_running:
        return Verdict([], "")
    findings: list[Finding] = []
    panic = console_panic(_new_console(guest, handover))
    if panic is not None:
        if "panic" in kinds and not crash_told(guest.name):
            findings.append(panic)
        return Verdict(findings, "")  # a panicked kernel has no journal to read
    journal_kinds = kinds - {"panic"}
    if not journal_kinds:
        return Verdict(findings, "")
    sent = time.time()
    command = journal_command(sent - handover.time, handover.cursor)
    result = guest.run_if_answering(command, timeout)
    received = time.time()
    if result is None:
        return Verdict(findings, "the guest did not answer: its journal was not read")
    lines = result.stdout.rstrip().splitlines()
    since_us = 0
    if not handover.cursor:
        try:
            # The guest's clock was read last, so between ``sent`` and ``received`` by
            # the host's, nearer the latter: guest minus host clock is at least this.
            offset = float(lines.pop().strip().replace(",", ".")) - received
        except (ValueError, IndexError):
            return Verdict(findings, f"unexpected answer: {result.stdout[-200:]!r}")
        since_us = int((handover.time + offset - SLACK) * 1e6)
    entries = parse_entries(lines, since_us)
    note = ""
    if result.exit_status != 0 and not entries:
        note = f"journalctl failed (exit {result.exit_status}): {result.stderr.strip()[:200]}"
    return Verdict(findings + journal_findings(entries, journal_kinds), note)
