"""What a guest asks of its qemu-ga: wait for a guest-exec'd process, ping, sync the
journal to disk."""

from __future__ import annotations

import base64
import time
from collections.abc import Sequence

from ..backends.base import Machine
from ..errors import GuestError
from ..qga import AgentCalls, GuestAgentError

# How often a wait asks qemu-ga again: soon at first, then less often. Each call costs
# the guest CPU (under TCG, in a clone's busiest second) and qemu-ga logs every one of
# them to the guest's journal.
POLL_FIRST = 0.01
POLL_MAX = 0.05


def agent_wait(agent: AgentCalls, pid: int, what: str, timeout: float) -> str:
    """Until a guest-exec'd process ends: its standard output (if it was captured);
    raises if it failed or took too long."""
    deadline = time.monotonic() + timeout
    pause = POLL_FIRST
    while True:
        status = agent.execute("guest-exec-status", pid=pid)
        if status.get("exited"):
            if status.get("exitcode") != 0:
                err = base64.b64decode(status.get("err-data", "")).decode(errors="replace")
                raise GuestAgentError(f"{what} exited {status.get('exitcode')}: {err}")
            return base64.b64decode(status.get("out-data", "")).decode(errors="replace")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not finish")
        time.sleep(pause)
        pause = min(pause * 1.5, POLL_MAX)


def agent_any_exists(agent: AgentCalls, paths: Sequence[str]) -> bool:
    """Whether one of ``paths`` can be opened in the guest (asked through qemu-ga,
    without starting a guest process)."""
    for path in paths:
        try:
            handle = agent.execute("guest-file-open", path=path, mode="r")
        except GuestAgentError:
            continue
        agent.execute("guest-file-close", handle=handle)
        return True
    return False


def agent_wait_for_files(agent: AgentCalls, paths: list[str], timeout: float) -> bool:
    """Until one of ``paths`` exists in the guest, asked by opening it (no guest
    process); False if none did within ``timeout`` s."""
    deadline = time.monotonic() + timeout
    pause = POLL_FIRST
    while True:
        if agent_any_exists(agent, paths):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(pause)
        pause = min(pause * 1.5, POLL_MAX)


def agent_answers(machine: Machine, timeout: float) -> bool:
    """Whether qemu-ga answers on the guest's agent channel within ``timeout`` s."""
    try:
        with machine.agent() as agent:
            agent.connect(timeout)
            agent.execute("guest-ping", timeout=timeout)
        return True
    except (OSError, TimeoutError, GuestAgentError):
        return False


def sync_by_agent(machine: Machine, timeout: float, timeout_scale: float) -> str:
    """Ask journald and the kernel to write everything to disk, through qemu-ga; what
    to add to the journal's source."""
    try:
        with machine.agent() as agent:
            agent.connect(5 * timeout_scale)
            started = agent.execute(
                "guest-exec", path="/bin/sh", arg=["-c", "journalctl --sync; sync"]
            )
            agent_wait(agent, started["pid"], "journalctl --sync", timeout)
    except (GuestAgentError, GuestError, OSError):
        return " (the guest agent did not answer: the last entries may be missing)"
    return " after journalctl --sync through the guest agent"
