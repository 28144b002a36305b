"""--kvm-record with real guests: an inner run whose test with a display fails keeps an
animated PNG of the screen (more than one frame: the test wrote to tty1 twice), listed
in the report and attached to the pytest-html report; the passing test keeps none; a
failing guest without a display gets a note, not an error."""

from __future__ import annotations

import struct

from pytest_kvm.recording import INDEX, NO_DISPLAY, RECORDING, _chunks, apng_frames
from tests.integration.support.inner import NOTHING, leftovers, run_ids

INNER = """
import time

import pytest


@pytest.mark.kvm(vnc=True)
def test_screen_fails(kvm_guest):
    kvm_guest.succeed("systemctl stop getty@tty1; clear >/dev/tty1; echo first >/dev/tty1")
    time.sleep(3)
    kvm_guest.succeed("echo second screen >/dev/tty1")
    time.sleep(3)
    assert False, "look at the recording"


@pytest.mark.kvm(vnc=True)
def test_screen_passes(kvm_guest):
    kvm_guest.succeed("echo passing >/dev/tty1")
    time.sleep(2)


def test_no_display_fails(kvm_guest):
    assert False, "no screen to record"
"""


def test_a_failed_test_keeps_a_recording_and_a_passed_one_none(
    pytester, image_arg, cache_arg, inner_env, tmp_path
):
    artifacts = tmp_path / "artifacts"
    html = tmp_path / "report.html"
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_subprocess(
        f"--kvm-image={image_arg}", cache_arg, "--kvm-record", f"--kvm-artifacts={artifacts}",
        f"--html={html}", "-rA", "-p", "no:cacheprovider",
    )  # fmt: skip
    result.assert_outcomes(failed=2, passed=1)
    out = result.stdout.str()
    recordings = sorted(artifacts.rglob(RECORDING))
    assert len(recordings) == 1, out
    assert "test_screen_fails" in str(recordings[0])
    data = recordings[0].read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    header = dict(_chunks(data))[b"IHDR"]
    width, height = struct.unpack(">II", header[:8])
    assert width >= 640 and height >= 400, (width, height)
    assert apng_frames(data) > 1
    index = (recordings[0].parent / INDEX).read_text()
    assert "distinct screens" in index
    assert "kvm recording:" in out and "distinct screens" in out
    assert NO_DISPLAY in out  # the guest without a display: a note
    assert "screen recording" in html.read_text()
    assert not list(artifacts.rglob("*test_screen_passes*"))
    assert leftovers(inner_env, run_ids(inner_env, out)) == NOTHING
