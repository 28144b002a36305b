"""--kvm-image URL and --kvm-offline end to end at configuration level (no guest boots),
against a local HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.images import qcow2_bytes
from tests.support.imageserver import ImageServer

IMAGE_TEST = """
def test_image(kvm_image):
    assert kvm_image.format == "qcow2"
    assert kvm_image.virtual_size == 16 * 1024 * 1024
    assert "downloads" in kvm_image.path.parts

def test_plain():
    pass
"""


@pytest.fixture(scope="module")
def qcow2(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return qcow2_bytes(tmp_path_factory.mktemp("img") / "disk.qcow2")


@pytest.fixture
def server(qcow2: bytes) -> Iterator[ImageServer]:
    srv = ImageServer(files={"/disk.qcow2": qcow2}).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def spec(server: ImageServer, qcow2: bytes) -> str:
    return f"{server.url('disk.qcow2')}#sha256={hashlib.sha256(qcow2).hexdigest()}"


def test_url_image_is_downloaded_once_and_used_offline(
    pytester: pytest.Pytester, server: ImageServer, spec: str, tmp_path: Path
) -> None:
    pytester.makepyfile(IMAGE_TEST)
    cache = tmp_path / "cache"
    args = [f"--kvm-image={spec}", f"--kvm-cache={cache}", "-v"]
    result = pytester.runpytest(*args)
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*test_image[[]disk[]] PASSED*"])
    result.stdout.fnmatch_lines(["*pytest-kvm: downloaded disk: 100%*"])
    assert len(server.seen) == 1
    # cached: offline is fine, and nothing is requested
    result = pytester.runpytest(*args, "--kvm-offline")
    result.assert_outcomes(passed=2)
    assert len(server.seen) == 1


@pytest.mark.parametrize("how", ["option", "env", "ini"])
def test_offline_refuses_an_image_not_in_the_cache(
    pytester: pytest.Pytester,
    server: ImageServer,
    spec: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    how: str,
) -> None:
    pytester.makepyfile(IMAGE_TEST)
    args = [f"--kvm-image={spec}", f"--kvm-cache={tmp_path / 'empty'}"]
    if how == "option":
        args.append("--kvm-offline")
    elif how == "env":
        monkeypatch.setenv("PYTEST_KVM_OFFLINE", "1")
    else:
        pytester.makeini("[pytest]\nkvm_offline = true\n")
    result = pytester.runpytest(*args)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        ["*ImageError: image 'disk' (http://127.0.0.1:*/disk.qcow2) is not in the cache*"]
    )
    result.stdout.fnmatch_lines(["*--kvm-offline forbids downloading it*"])
    assert server.seen == []


def test_a_malformed_url_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(IMAGE_TEST)
    result = pytester.runpytest("--kvm-image=https://h.example/x.qcow2#sha256=123")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert "command line --kvm-image" in err and "sha256=HEX (64 hex digits)" in err, err
