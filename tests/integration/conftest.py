"""Integration tests boot real guests; they need ``--kvm-image`` (scripts/test.sh gives it)."""

from __future__ import annotations

from pathlib import Path

import pytest


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
