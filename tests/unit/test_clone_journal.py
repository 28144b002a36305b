"""A clone's start waits for the journald it restarted (its new ``system.journal``):
through qemu-ga's file calls (no guest process), or a shell loop over SSH."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

from pytest_kvm.guest.agent import agent_wait, agent_wait_for_files
from pytest_kvm.guest.clone import wait_for_files_script
from pytest_kvm.qga import AgentCalls, GuestAgentError


class FilesAgent(AgentCalls):
    """guest-file-open/close over a set of paths; ``appear`` makes a path exist after
    that many opens of it."""

    def __init__(self, appear: dict[str, int]) -> None:
        self.appear = appear
        self.opens: dict[str, int] = {}
        self.open_handles = 0

    def execute_args(self, command: str, arguments: dict[str, Any], timeout: float = 10.0) -> Any:
        if command == "guest-file-open":
            path = arguments["path"]
            assert arguments["mode"] == "r"
            self.opens[path] = self.opens.get(path, 0) + 1
            if path not in self.appear or self.opens[path] <= self.appear[path]:
                raise GuestAgentError(f"open {path}: No such file or directory")
            self.open_handles += 1
            return 7
        if command == "guest-file-close":
            self.open_handles -= 1
            return {}
        raise AssertionError(command)


def test_the_agent_waits_until_one_of_the_files_exists() -> None:
    runtime, persistent = "/run/log/journal/a/system.journal", "/var/log/journal/a/system.journal"
    agent = FilesAgent({persistent: 3})
    assert agent_wait_for_files(agent, [runtime, persistent], 5)
    assert agent.opens[persistent] == 4 and agent.opens[runtime] == 4
    assert agent.open_handles == 0  # each handle closed


def test_the_agent_gives_up_after_its_timeout() -> None:
    agent = FilesAgent({})
    assert not agent_wait_for_files(agent, ["/never", "/nor"], 0.1)
    assert agent.opens["/never"] >= 2 and agent.opens["/nor"] >= 2


def test_the_shell_loop_waits_for_one_file_and_gives_up(tmp_path: Path) -> None:
    never, late = tmp_path / "it's never", tmp_path / "late"
    proc = subprocess.Popen(["sh", "-c", wait_for_files_script([str(never), str(late)], 10)])
    time.sleep(0.3)
    assert proc.poll() is None  # still waiting
    late.write_text("")
    assert proc.wait(20) == 0
    missing = wait_for_files_script([str(never)], 0.2)
    assert subprocess.run(["sh", "-c", missing], timeout=20).returncode == 1


class ExecAgent(AgentCalls):
    """guest-exec-status of a process that ends ``after`` seconds from the first ask."""

    def __init__(self, after: float) -> None:
        self.after = after
        self.started = 0.0
        self.calls = 0

    def execute_args(self, command: str, arguments: dict[str, Any], timeout: float = 10.0) -> Any:
        assert command == "guest-exec-status" and arguments == {"pid": 42}
        self.calls += 1
        self.started = self.started or time.monotonic()
        if time.monotonic() - self.started < self.after:
            return {"exited": False}
        return {"exited": True, "exitcode": 0, "out-data": "ZG9uZQ=="}


def test_a_wait_for_a_guest_process_asks_less_often_as_it_goes_on() -> None:
    """qemu-ga logs every call to the guest's journal, and each costs the guest CPU in
    a clone's busiest second: soon at first (a short script is seen at once), then at
    most every 50 ms."""
    quick = ExecAgent(0.0)
    assert agent_wait(quick, 42, "quick", 5) == "done" and quick.calls == 1
    slow = ExecAgent(0.6)
    assert agent_wait(slow, 42, "slow", 5) == "done"
    assert 8 <= slow.calls <= 20  # a poll every 10 ms would be about 60
