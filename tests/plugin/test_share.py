"""share= given to the factory wrongly: the test fails with one line naming the value
and kvm_guest_factory, before any guest starts."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

CONFTEST = """
from pathlib import Path

import pytest

from pytest_kvm.images import Image


@pytest.fixture
def kvm_image():
    return Image("ok", Path("/nonexistent.qcow2"), "qcow2", "ok")
"""


@pytest.mark.parametrize(
    ("share", "message"),
    [
        ('{"/no such dir/x": "/mnt/x"}', "host folder '/no such dir/x' does not exist"),
        ('{"/tmp": "relative"}', "guest path 'relative' for '/tmp' is not an absolute path"),
        ('["/tmp"]', "['/tmp'] is not a dict of host folder -> guest path"),
    ],
)
def test_factory_share_errors(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch, share: str, message: str
) -> None:
    image = pytester.path / "ok.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M"], check=True)
    runtime = tmp_path / "rt"
    runtime.mkdir()
    monkeypatch.setenv("PYTEST_KVM_RUNTIME_DIR", str(runtime))
    # The image is not looked at (no libguestfs probe): the request is refused first.
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        f"def test_guest(kvm_guest_factory):\n    kvm_guest_factory(share={share})\n"
    )
    result = pytester.runpytest(f"--kvm-image={image}")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    line = next(s for s in out.splitlines() if s.startswith("E ") and message in s)
    assert "kvm_guest_factory share=: " in line, out
    assert list(runtime.iterdir()) == []  # nothing started
