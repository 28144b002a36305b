"""Failure artifacts, the pytest-html report, -v boot timings and boot progress lines,
seen by a user of an inner pytest run."""

from __future__ import annotations

import base64
import itertools
import json
import re
import secrets

import pytest

from tests.support.processes import qemu_pids_under

pytestmark = pytest.mark.integration

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TIMINGS_LINE = re.compile(r"^    kvm boot timings: kvm-\S+: overlay [\d.]+ s, .*total [\d.]+ s$")


def test_failed_test_leaves_artifacts_and_an_html_report(pytester, image_arg, cache_arg, inner_env):
    pytest.importorskip("pytest_html")
    token = secrets.token_hex(6)
    pytester.makepyfile(
        f"""
        def test_passes(kvm_guest):
            kvm_guest.succeed("true")

        def test_fails(kvm_guest):
            kvm_guest.succeed("logger -t pytest-kvm-test 'journal {token}'")
            kvm_guest.succeed("echo 'console {token}' > /dev/ttyS0")
            assert False
        """
    )
    arts = pytester.path / "arts"
    result = pytester.runpytest_subprocess(
        f"--kvm-image={image_arg}", cache_arg, f"--kvm-artifacts={arts}",
        "-p", "no:cacheprovider", "-v", "--html=report.html", "--self-contained-html",
    )  # fmt: skip
    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    # -v: a line of boot phase timings under each test's result.
    timings = [line for line in result.stdout.lines if TIMINGS_LINE.match(line)]
    assert len(timings) >= 2, out
    assert all("restore" in line and "ssh_ready" in line for line in timings)
    # The failure section shows the console tail and names the artifacts folder.
    assert f"console {token}" in out
    [folder] = [p for p in arts.glob("*/*") if p.is_dir()]
    assert "__test_fails[" in folder.parent.name
    assert str(folder) in out

    files = {p.name for p in folder.iterdir()}
    assert {"serial.log", "qemu-argv.txt", "qmp-events.txt", "boot-timings.txt",
            "journal.txt", "journal-source.txt", "screen.png"} <= files, files  # fmt: skip
    assert f"console {token}" in (folder / "serial.log").read_text(errors="replace")
    argv = (folder / "qemu-argv.txt").read_text().splitlines()
    assert argv[0] == "qemu-system-x86_64" and "VGA" in argv
    events = [json.loads(line) for line in (folder / "qmp-events.txt").read_text().splitlines()]
    assert events, "a restored clone reports at least its RESUME"
    for event in events:
        assert isinstance(event["event"], str)
        assert set(event["timestamp"]) == {"seconds", "microseconds"}
    assert "RESUME" in {event["event"] for event in events}
    phases = dict(
        line.split(": ") for line in (folder / "boot-timings.txt").read_text().splitlines()
    )
    assert {"overlay", "restore", "ssh_ready", "total"} <= set(phases)
    assert "pytest-kvm-test" in (folder / "journal.txt").read_text()
    assert f"journal {token}" in (folder / "journal.txt").read_text()
    assert (folder / "journal-source.txt").read_text() == "journalctl over SSH\n"
    assert (folder / "screen.png").read_bytes().startswith(PNG_MAGIC)

    # pytest-html: the screenshot as an image, the console tail as a text extra.
    html = (pytester.path / "report.html").read_text()
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html)
    assert any(base64.b64decode(data).startswith(PNG_MAGIC) for data in images)
    texts = re.findall(r"data:text/plain;charset=utf-8;base64,([A-Za-z0-9+/=]+)", html)
    assert any(f"console {token}" in base64.b64decode(data).decode() for data in texts)
    assert list(inner_env.iterdir()) == []
    assert qemu_pids_under(inner_env) == []


def test_a_real_boot_says_what_it_waits_for(pytester, image_arg, cache_arg, inner_env):
    """A real boot's progress lines; and the marker's snapshot=False boots for real (no
    template in use, nothing restored), one guest's boot for both."""
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.kvm(snapshot=False)
        def test_boots(kvm_guest):
            assert kvm_guest.template is None
            assert "restore" not in kvm_guest.boot_timings
            log = kvm_guest.serial_log.read_text(errors="replace")
            assert "restored from template" not in log and "Linux version" in log
            assert kvm_guest.succeed("hostname").strip() == kvm_guest.name
        """
    )
    result = pytester.runpytest_subprocess(
        f"--kvm-image={image_arg}", cache_arg, "-p", "no:cacheprovider", "-v"
    )
    result.assert_outcomes(passed=1)
    waits = [
        re.match(r"pytest-kvm: guest kvm-\S+: waiting for SSH \((console: .+|console silent)\), "
                 r"(\d+) s$", line)
        for line in result.stdout.lines
    ]  # fmt: skip
    seconds = [int(m.group(2)) for m in waits if m]
    assert seconds, result.stdout.str()
    # The first after ~10 s, then every ~10 s: not a line per connection attempt.
    assert seconds[0] >= 10 and seconds == sorted(seconds)
    assert all(b - a >= 9 for a, b in itertools.pairwise(seconds))
    [timings] = [line for line in result.stdout.lines if TIMINGS_LINE.match(line)]
    assert "qemu_start" in timings and "ssh_ready" in timings and "restore" not in timings
    assert list(inner_env.iterdir()) == []
