"""The error gate's logic: --kvm-fail-on values, which journal entries fail under which
kind, the console panic, kvm_allow patterns and the evidence text."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from pytest_kvm.config import parse_fail_on, resolve
from pytest_kvm.errors import GuestCrashed, KvmConfigError, crash_told
from pytest_kvm.gate import allowed, evidence
from pytest_kvm.guestlog import (
    Finding,
    classify,
    console_panic,
    handover_command,
    journal_command,
    journal_findings,
    parse_entries,
)

ALL = frozenset({"panic", "oops", "coredump", "journal-err"})


def kernel(message: str, priority: int = 4) -> dict[str, str]:
    return {"_TRANSPORT": "kernel", "SYSLOG_IDENTIFIER": "kernel", "PRIORITY": str(priority),
            "MESSAGE": message}  # fmt: skip


def journal(message: str, priority: int = 6, ident: str = "systemd") -> dict[str, str]:
    return {"_TRANSPORT": "journal", "SYSLOG_IDENTIFIER": ident, "_PID": "1",
            "PRIORITY": str(priority), "SYSLOG_FACILITY": "3", "MESSAGE": message}  # fmt: skip


@pytest.mark.parametrize(
    ("value", "kinds"),
    [
        ("panic", {"panic"}),
        ("coredump,oops", {"coredump", "oops"}),
        (" Panic , journal-err ", {"panic", "journal-err"}),
        ("oops coredump", {"oops", "coredump"}),
        (["oops", "coredump,panic"], {"oops", "coredump", "panic"}),
        ("none", set()),
        ("", set()),
        ((), set()),
    ],
)
def test_fail_on_values(value, kinds):
    assert parse_fail_on(value, "t") == frozenset(kinds)


@pytest.mark.parametrize("value", ["panic,warnings", "none,panic", "oops;coredump", 3, [1]])
def test_bad_fail_on_names_the_value_and_where(value):
    with pytest.raises(KvmConfigError, match=r"^where: .*(not one of|not a list of)"):
        parse_fail_on(value, "where")


def test_fail_on_default_env_and_marker():
    assert resolve({}, {}, lambda key: None).fail_on == {"panic"}
    ini = {"kvm_fail_on": "oops"}.get
    assert resolve({}, {}, ini).fail_on == {"oops"}
    s = resolve({}, {"PYTEST_KVM_FAIL_ON": "coredump"}, ini)
    assert s.fail_on == {"coredump"}  # environment beats ini
    assert resolve({"fail_on": "none"}, {"PYTEST_KVM_FAIL_ON": "oops"}, ini).fail_on == set()
    assert s.with_marker({"fail_on": "none"}, "t").fail_on == frozenset()


@pytest.mark.parametrize(
    ("entry", "kind"),
    [
        (kernel("WARNING: CPU: 1 PID: 42 at drivers/foo.c:12 foo_probe+0x1/0x2 [foo]"), "oops"),
        (kernel("BUG: kernel NULL pointer dereference, address: 0000000000000000", 1), "oops"),
        (kernel("watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [cat:1]", 0), "oops"),
        (kernel("Oops: 0002 [#1] PREEMPT SMP NOPTI", 1), "oops"),
        (kernel("kernel BUG at mm/slub.c:379!", 0), "oops"),
        (kernel("general protection fault, probably for non-canonical address 0xdead", 4),
         "oops"),
        (kernel("python3[501]: segfault at 0 ip 00007fe46b19e219 sp 00007fff2836ca28 error 4 "
                "in libc.so.6[7fe46b06e000+156000]", 6), "coredump"),
        (kernel("traps: a.out[77] trap invalid opcode ip:401000 sp:7ffd error:0 in a.out", 6),
         "coredump"),
        (kernel("traps: a.out[77] general protection fault ip:401000 sp:7ffd error:0", 6),
         "coredump"),
        (journal("crashy.service: Main process exited, code=killed, status=11/SEGV", 5),
         "coredump"),
        (journal("crashy.service: Main process exited, code=dumped, status=6/ABRT", 5),
         "coredump"),
        (journal("crashy.service: Failed with result 'core-dump'.", 4), "coredump"),
        ({**journal("Process 812 (sh) of user 0 dumped core.", 2, "systemd-coredump"),
          "MESSAGE_ID": "fc2e22bc6ee647b6b90729ab34a250b1"}, "coredump"),
        (journal("disk on fire", 3, "gatetest"), "journal-err"),
        (journal("worse", 0, "gatetest"), "journal-err"),
        (kernel("ata1: failed to resume link", 3), "journal-err"),
        # Not errors: stopped by TERM, a warning, info, /dev/kmsg lines from a process.
        (journal("x.service: Main process exited, code=killed, status=15/TERM", 5), ""),
        (journal("File /var/log/journal/x/system.journal corrupted or uncleanly shut down", 4),
         ""),
        ({**kernel("CPU: 0 PID: 1 at fake"), "SYSLOG_IDENTIFIER": "WARNING",
          "SYSLOG_FACILITY": "1"}, ""),
        ({**kernel("WARNING: CPU: 0 PID: 1 at fake.c:1 fake"), "SYSLOG_FACILITY": "1"}, ""),
        (journal("WARNING: CPU: 0 PID: 1 at fake.c:1 fake", 4, "myapp"), ""),
        (journal("segfault at 0 ip 0 (a log line about one)", 6, "myapp"), ""),
    ],
)  # fmt: skip
def test_classify(entry, kind):
    assert classify(entry, ALL) == kind


def test_classify_only_the_kinds_asked_for():
    oops = kernel("WARNING: CPU: 0 PID: 9 at x.c:1 f", 4)
    err_oops = kernel("BUG: unable to handle page fault for address: 0", 1)
    assert classify(oops, frozenset({"coredump", "journal-err"})) == ""
    assert classify(err_oops, frozenset({"journal-err"})) == "journal-err"
    assert classify(err_oops, frozenset({"panic"})) == ""


def test_entries_are_parsed_from_json_lines_since_the_hand_over():
    lines = [
        "1795978618.015541830",  # the guest's clock line is skipped here
        json.dumps({"__REALTIME_TIMESTAMP": "1000", "MESSAGE": "before", "PRIORITY": "3"}),
        json.dumps({"__REALTIME_TIMESTAMP": "2000", "MESSAGE": [104, 105, 255], "PRIORITY": "3"}),
        "{not json",
        json.dumps({"__REALTIME_TIMESTAMP": "3000", "MESSAGE": None, "_PID": 7}),
    ]
    entries = parse_entries(lines, since_us=2000)
    assert [e["MESSAGE"] for e in entries] == ["hi\ufffd", ""]
    assert entries[1]["_PID"] == "7"


def test_findings_show_lines_like_journalctl():
    found = journal_findings(
        [journal("disk on fire", 3, "gatetest"), kernel("WARNING: CPU: 0 PID: 1 at a.c:1 f")],
        ALL,
    )
    assert found == [
        Finding("journal-err", "gatetest[1]: disk on fire", "disk on fire"),
        Finding("oops", "kernel: WARNING: CPU: 0 PID: 1 at a.c:1 f",
                "WARNING: CPU: 0 PID: 1 at a.c:1 f"),
    ]  # fmt: skip


def test_console_panic_with_its_cause():
    text = "a\nb\n[ 1.0] sysrq: Trigger a crash\n[ 1.1] Kernel panic - not syncing: sysrq\nc\n"
    found = console_panic(text)
    assert found is not None and found.kind == "panic"
    assert found.line.splitlines()[-2:] == ["[ 1.0] sysrq: Trigger a crash",
                                            "[ 1.1] Kernel panic - not syncing: sysrq"]  # fmt: skip
    assert found.message == "Kernel panic - not syncing: sysrq"
    assert console_panic("nothing\nhere\n") is None


def test_allow_patterns_match_the_line_or_the_message():
    finding = Finding("journal-err", "gatetest[1]: disk on fire", "disk on fire")
    assert finding.excused([re.compile(r"^disk on fire$")])
    assert finding.excused([re.compile(r"^gatetest\[")])
    assert not finding.excused([re.compile("water")])
    assert not finding.excused([])


class Node:
    nodeid = "t.py::test_x"

    def __init__(self, *markers):
        self.markers = markers

    def iter_markers(self, name):
        return iter(m for m in self.markers if m.name == name)


def test_allowed_reads_every_kvm_allow_marker():
    node = Node(pytest.mark.kvm_allow("a+", re.compile("b")).mark,
                pytest.mark.kvm_allow("c").mark, pytest.mark.kvm(memory=1).mark)  # fmt: skip
    assert [p.pattern for p in allowed(node)] == ["a+", "b", "c"]


@pytest.mark.parametrize(
    ("mark", "needle"),
    [
        (pytest.mark.kvm_allow("(").mark, "kvm_allow('('): not a regular expression"),
        (pytest.mark.kvm_allow(5).mark, "kvm_allow(5): not a regular expression"),
        (pytest.mark.kvm_allow().mark, "give one or more regular expressions"),
        (pytest.mark.kvm_allow(regex="x").mark, "no keywords"),
    ],
)
def test_bad_allow_names_the_test_and_value(mark, needle):
    with pytest.raises(KvmConfigError, match=re.escape(needle)) as info:
        allowed(Node(mark))
    assert str(info.value).startswith("t.py::test_x: @pytest.mark.kvm_allow")


def test_evidence_names_guest_kinds_lines_and_the_way_out():
    findings = [Finding("coredump", f"systemd[1]: line {i}") for i in range(25)]
    text = evidence("kvm-1", frozenset({"oops", "coredump"}), findings)
    assert text.startswith("pytest-kvm: guest 'kvm-1' logged errors during the test "
                           "(--kvm-fail-on coredump,oops):")  # fmt: skip
    assert "  coredump: systemd[1]: line 19" in text and "line 20" not in text
    assert "... and 5 more" in text and "kvm_allow" in text


def test_the_command_syncs_reads_and_reads_the_guests_clock_last():
    cmd = journal_command(12.9)
    assert cmd.startswith("journalctl --sync 2>/dev/null; journalctl ")
    assert "--since=-16s; " in cmd
    assert cmd.endswith('t="${EPOCHREALTIME:-}"; [ -n "$t" ] || t=$(date +%s.%N); echo "$t"')
    assert "-o json" in cmd and "-p info" in cmd


def test_with_a_cursor_the_command_reads_after_it_and_no_clock():
    cmd = journal_command(3.0, "s=ab;i=1f;b=cd;m=9;t=61;x=0'")
    assert cmd.startswith("journalctl --sync 2>/dev/null; journalctl ")
    assert cmd.endswith("""--after-cursor='s=ab;i=1f;b=cd;m=9;t=61;x=0'"'"''""")
    assert "EPOCHREALTIME" not in cmd


def test_a_guest_crashed_error_is_remembered_for_the_gate():
    assert not crash_told("kvm-test-guestlog-1")
    GuestCrashed("panicked", "kvm-test-guestlog-1")
    assert crash_told("kvm-test-guestlog-1")
    GuestCrashed("no guest known")  # no name: nothing to remember


def _fake_tools(bin_dir: Path, journal: Path, late: int) -> None:
    """``logger`` appends to ``journal``; ``journalctl`` shows its last line (and a
    cursor) only from its ``late``-th call on: a journald still restarting."""
    bin_dir.mkdir()
    (bin_dir / "logger").write_text(f'#!/bin/sh\necho "$3" >>{journal}\n')
    (bin_dir / "journalctl").write_text(
        "#!/bin/sh\n"
        f"n=$(cat {journal}.calls 2>/dev/null || echo 0); echo $((n + 1)) >{journal}.calls\n"
        f'[ "$n" -ge {late} ] || exit 0\n'
        f'tail -n 1 {journal}; echo "-- cursor: s=1;i=$n"\n'
    )
    for tool in ("logger", "journalctl"):
        (bin_dir / tool).chmod(0o755)


def test_the_hand_over_waits_for_its_own_entry_and_prints_its_cursor(tmp_path):
    journal = tmp_path / "journal"
    _fake_tools(tmp_path / "bin", journal, late=3)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin"}
    result = subprocess.run(
        ["sh", "-c", handover_command("f00d")], env=env, capture_output=True, text=True,
        timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["f00d", "-- cursor: s=1;i=3"]
    assert journal.read_text() == "f00d\n"  # logged once, looked for until written


def test_a_guest_without_journalctl_gives_up_at_once(tmp_path):
    (tmp_path / "bin").mkdir()
    for tool in ("sh", "logger"):  # no journalctl on PATH
        (tmp_path / "bin" / tool).symlink_to(subprocess.check_output(
            ["sh", "-c", f"command -v {tool}"], text=True).strip())  # fmt: skip
    result = subprocess.run(
        ["sh", "-c", handover_command("f00d")], env={"PATH": str(tmp_path / "bin")},
        capture_output=True, text=True, timeout=5, check=False,
    )  # fmt: skip
    assert result.returncode == 1 and "cursor" not in result.stdout
