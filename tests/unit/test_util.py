"""The shared helpers of pytest_kvm.util."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from pytest_kvm.errors import GuestLaunchError
from pytest_kvm.util import check_path_for_qemu, pid_alive, process_argv, sha256_file, tail_text


def test_sha256_file_hashes_the_content(tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_tail_text_keeps_the_last_lines() -> None:
    assert tail_text("a\nb\nc\n\n", 2) == "b\nc"


def test_a_comma_in_a_path_is_refused() -> None:
    check_path_for_qemu("/tmp/disk.qcow2")
    with pytest.raises(GuestLaunchError, match="comma"):
        check_path_for_qemu("/tmp/a,b.qcow2")


def test_this_process_is_alive_and_has_an_argv() -> None:
    assert pid_alive(os.getpid())
    argv = process_argv(os.getpid())
    assert argv and argv[0]
