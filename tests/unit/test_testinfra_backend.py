"""guest.host without testinfra installed: a clear error that says what to install."""

from __future__ import annotations

import sys

import pytest

from pytest_kvm.errors import KvmUnavailable
from pytest_kvm.testinfra_backend import MissingTestinfra, make_host


def test_missing_testinfra_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "testinfra.host", None)  # import fails
    monkeypatch.setitem(sys.modules, "testinfra.backend.paramiko", None)
    with pytest.raises(MissingTestinfra) as info:
        make_host("guest 'kvm-0000-main-01' (debian-12)", "root@127.0.0.1:2222", None)  # type: ignore[arg-type]
    assert isinstance(info.value, ImportError) and isinstance(info.value, KvmUnavailable)
    assert "guest 'kvm-0000-main-01' (debian-12): guest.host needs testinfra" in str(info.value)
    assert "pip install 'pytest-kvm[testinfra]'" in str(info.value)
