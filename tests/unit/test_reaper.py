"""Leases and reaping, with real processes standing in for runs and QEMU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_kvm.errors import KvmConfigError
from pytest_kvm.reaper import (
    LEASE_DIR_ENV,
    Lease,
    lease_dir,
    leases,
    owner_fields,
    process_alive,
    process_start,
    reap,
)


@pytest.fixture
def book(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "leases"
    monkeypatch.setenv(LEASE_DIR_ENV, str(directory))
    return lease_dir()


def _dead_pid() -> tuple[int, int | None]:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    start = process_start(proc.pid)
    proc.wait()
    return proc.pid, start


def _sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "60"])


def test_lease_dir_is_private(book: Path) -> None:
    assert book.stat().st_mode & 0o777 == 0o700


def test_lease_dir_made_by_someone_else_is_refused(tmp_path: Path, monkeypatch) -> None:
    shared = tmp_path / "open"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    monkeypatch.setenv(LEASE_DIR_ENV, str(shared))
    with pytest.raises(KvmConfigError, match="not private"):
        lease_dir()


def test_process_identity_survives_pid_reuse() -> None:
    me, start = os.getpid(), process_start(os.getpid())
    assert start is not None and process_alive(me, start)
    assert not process_alive(me, start + 1)  # same PID, another process
    pid, start = _dead_pid()
    assert not process_alive(pid, start)
    assert not process_alive(None, None)


def test_lease_files_are_private_and_rewritten_whole(book: Path) -> None:
    lease = Lease.create(book, "guest-x", {"kind": "guest", "name": "x", **owner_fields()})
    assert lease.path.stat().st_mode & 0o777 == 0o600
    lease.update(qemu_pid=123)
    assert Lease.load(lease.path).data["qemu_pid"] == 123  # type: ignore[union-attr]
    assert [p.name for p in book.iterdir()] == ["guest-x.json"]  # no temporary left
    assert lease.owner_alive
    lease.remove()
    lease.remove()  # twice is fine
    assert leases(book) == []


def test_reap_removes_dead_runs_and_spares_live_ones(book: Path, tmp_path: Path) -> None:
    dead, dead_start = _dead_pid()
    dead_dir = tmp_path / "pytest-kvm-dead-abc"
    (dead_dir / "kvm-dead-main-01").mkdir(parents=True)
    live_dir = tmp_path / "pytest-kvm-live-abc"
    live_dir.mkdir()
    Lease.create(book, "run-dead", {"kind": "run", "run_id": "dead", "pid": dead,
                                    "pid_start": dead_start, "dir": str(dead_dir)})  # fmt: skip
    Lease.create(book, "run-live", {"kind": "run", "run_id": "live", "dir": str(live_dir),
                                    **owner_fields()})  # fmt: skip
    result = reap(directory=book)
    assert not dead_dir.exists()
    assert live_dir.exists()
    assert [lease.data["run_id"] for lease in leases(book)] == ["live"]
    assert len(result.reaped) == 1 and str(dead_dir) in result.reaped[0]


def test_reap_kills_only_the_qemu_it_names(book: Path, tmp_path: Path) -> None:
    """A lease whose PID is now some other program (not QEMU for that guest) must not
    get that program killed; kept guests wait for include_kept."""
    dead, dead_start = _dead_pid()
    other = _sleeper()
    try:
        Lease.create(book, "guest-a", {
            "kind": "guest", "run_id": "r1", "name": "kvm-r1-main-01", "pid": dead,
            "pid_start": dead_start, "qemu_pid": other.pid,
            "qemu_start": process_start(other.pid),
        })  # fmt: skip
        reap(directory=book)
        assert other.poll() is None
        assert leases(book) == []
    finally:
        other.kill()
        other.wait()


def test_kept_guests_are_reaped_only_when_asked(book: Path, tmp_path: Path) -> None:
    dead, dead_start = _dead_pid()
    workdir = tmp_path / "pytest-kvm-r2-x" / "kvm-r2-main-01"
    workdir.mkdir(parents=True)
    Lease.create(book, "guest-k", {"kind": "guest", "run_id": "r2", "name": "kvm-r2-main-01",
                                   "pid": dead, "pid_start": dead_start, "kept": True,
                                   "workdir": str(workdir)})  # fmt: skip
    first = reap(directory=book)
    assert first.reaped == [] and len(first.kept) == 1 and workdir.exists()
    second = reap(directory=book, include_kept=True)
    assert len(second.reaped) == 1 and not workdir.exists()


def test_reap_never_removes_paths_it_did_not_make(book: Path, tmp_path: Path) -> None:
    dead, dead_start = _dead_pid()
    precious = tmp_path / "home-of-someone"
    precious.mkdir()
    Lease.create(book, "run-evil", {"kind": "run", "run_id": "e", "pid": dead,
                                    "pid_start": dead_start, "dir": str(precious)})  # fmt: skip
    reap(directory=book)
    assert precious.exists()
    assert leases(book) == []


def test_cli_reap_dry_run_lists_and_removes_nothing(book: Path, tmp_path: Path) -> None:
    dead, dead_start = _dead_pid()
    run_dir = tmp_path / "pytest-kvm-d1-x"
    run_dir.mkdir()
    Lease.create(book, "run-d1", {"kind": "run", "run_id": "d1", "pid": dead,
                                  "pid_start": dead_start, "dir": str(run_dir)})  # fmt: skip
    env = {**os.environ, LEASE_DIR_ENV: str(book)}
    listed = subprocess.run([sys.executable, "-m", "pytest_kvm.cli", "reap", "--dry-run"],
                            capture_output=True, text=True, env=env)  # fmt: skip
    assert listed.returncode == 0 and "would reap run d1" in listed.stdout
    assert run_dir.exists()
    done = subprocess.run([sys.executable, "-m", "pytest_kvm.cli", "reap"],
                          capture_output=True, text=True, env=env)  # fmt: skip
    assert done.returncode == 0 and "reaped run d1" in done.stdout
    assert not run_dir.exists()
