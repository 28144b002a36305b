"""A guest booted from an image given by URL: the run's own image served on 127.0.0.1,
downloaded (checksummed) into a fresh cache, then booted."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_kvm.images import Image
from tests.support.images import sha256
from tests.support.imageserver import ImageServer


def test_guest_boots_from_a_downloaded_image(
    pytester: pytest.Pytester, kvm_image: Image, inner_env: Path, tmp_path: Path
) -> None:
    if kvm_image.format != "qcow2" or kvm_image.is_encrypted:
        pytest.skip("needs a plain qcow2 image to serve")
    server = ImageServer(files={"/base.qcow2": kvm_image.path}).start()
    try:
        spec = f"{server.url('base.qcow2')}#sha256={sha256(kvm_image.path)}"
        pytester.makepyfile(
            """
            def test_boot(kvm_guest, kvm_image):
                assert "downloads" in kvm_image.path.parts
                assert kvm_guest.succeed("echo from-a-url").strip() == "from-a-url"
            """
        )
        result = pytester.runpytest_subprocess(
            f"--kvm-image={spec}", f"--kvm-cache={tmp_path / 'cache'}", "--kvm-no-snapshot"
        )
        result.assert_outcomes(passed=1)
        assert [s.status for s in server.requests("base.qcow2")] == [200]
        assert server.sent("base.qcow2") == kvm_image.path.stat().st_size
    finally:
        server.stop()
