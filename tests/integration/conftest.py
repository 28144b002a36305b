"""Integration tests boot real guests; they need ``--kvm-image`` (scripts/test.sh gives it)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def qemu_pids_under(directory: Path) -> list[int]:
    """PIDs of qemu processes whose command line mentions ``directory``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and b"qemu-system" in argv[0] and str(directory).encode() in b" ".join(argv):
            pids.append(int(entry.name))
    return pids


@pytest.fixture
def image_arg(request: pytest.FixtureRequest) -> str:
    images = request.config.getoption("kvm_image") or []
    if not images:
        pytest.skip("needs --kvm-image")
    return str(images[0])


@pytest.fixture
def inner_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private runtime dir for pytester runs, so leftovers can be counted."""
    runtime = tmp_path / "rt"
    runtime.mkdir()
    monkeypatch.setenv("PYTEST_KVM_RUNTIME_DIR", str(runtime))
    return runtime


@pytest.fixture
def cache_arg(request: pytest.FixtureRequest) -> str:
    """``--kvm-cache`` naming this run's cache, for inner runs whose HOME differs."""
    from pytest_kvm.plugin import settings_key

    return f"--kvm-cache={request.config.stash[settings_key].cache}"
