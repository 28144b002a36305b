"""What others may plant in /tmp: symlinks, FIFOs, directories they own. Real files,
and a real other user (uid 65534, through setpriv) where ownership matters."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_kvm.backends.libvirt import file_sha256
from pytest_kvm.errors import KvmConfigError
from pytest_kvm.network import MacReservation
from pytest_kvm.private import NotRegularFile, private_dir, read_regular, write_private

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.fixture
def shared_tmp(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A world-writable sticky directory like /tmp, reachable by the other user, and
    the temporary directory of the code under test."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to act as another user")
    path = Path(tempfile.mkdtemp(prefix="pytest-kvm-test-shared-", dir="/tmp"))
    path.chmod(0o1777)
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    try:
        yield path
    finally:
        shutil.rmtree(path)


def as_nobody(*argv: str, stdin: str | None = None) -> None:
    subprocess.run([*NOBODY, *argv], input=stdin, text=True, check=True, capture_output=True)


class Hung(Exception):  # not an OSError: the code under test must not swallow it
    pass


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail instead of hanging (an open of a FIFO without a writer blocks forever)."""

    def expired(_signum: int, _frame: object) -> None:
        raise Hung(f"still blocked after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# -- the shared helper ---------------------------------------------------------------


def test_private_dir_made_by_another_user_is_refused(shared_tmp: Path) -> None:
    theirs = shared_tmp / "theirs"
    as_nobody("mkdir", "-m", "0700", str(theirs))
    with pytest.raises(KvmConfigError, match=r"not private to this user \(owner uid 65534"):
        private_dir(theirs, "test directory")


def test_lease_directory_of_another_user_is_refused(shared_tmp: Path, monkeypatch) -> None:
    from pytest_kvm.reaper import LEASE_DIR_ENV, lease_dir

    theirs = shared_tmp / "leases"
    as_nobody("mkdir", "-m", "0700", str(theirs))
    monkeypatch.setenv(LEASE_DIR_ENV, str(theirs))
    with pytest.raises(KvmConfigError) as info:
        lease_dir()
    assert f"lease directory {theirs} is not private to this user (owner uid 65534" in str(
        info.value
    )
    assert f"set {LEASE_DIR_ENV}" in str(info.value)


def test_private_dir_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    real = private_dir(tmp_path / "real", "test directory")
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(KvmConfigError, match="is not a directory"):
        private_dir(tmp_path / "link", "test directory")


def test_private_files_never_follow_symlinks_nor_open_fifos(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_text("precious\n")
    link = tmp_path / "file"
    link.symlink_to(target)
    with pytest.raises(OSError):
        read_regular(link)
    write_private(link, "new\n")
    assert target.read_text() == "precious\n"  # the link was replaced, not followed
    assert not link.is_symlink() and link.read_text() == "new\n"
    assert link.stat().st_mode & 0o777 == 0o600
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with deadline(5), pytest.raises(NotRegularFile):
        read_regular(fifo)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "file", "precious"]


# -- MAC reservations ---------------------------------------------------------------


def test_mac_reservation_skips_a_planted_fifo(tmp_path: Path, monkeypatch) -> None:
    macs = tmp_path / "macs"
    values = iter([b"\x01\x02\x03", b"\x01\x02\x04"])
    monkeypatch.setattr("secrets.token_bytes", lambda n: next(values))
    private_dir(macs, "test directory")
    os.mkfifo(macs / "026b76010203")
    with deadline(5):
        got = MacReservation.reserve(directory=macs)
    assert got.mac == "02:6b:76:01:02:04"
    got.release()


def test_mac_directory_of_another_user_is_refused(shared_tmp: Path) -> None:
    theirs = shared_tmp / "macs"
    as_nobody("mkdir", "-m", "1777", str(theirs))  # the old shared layout, sticky
    as_nobody("mkfifo", "-m", "0666", str(theirs / "026b76010203"))
    with deadline(5), pytest.raises(KvmConfigError) as info:
        MacReservation.reserve(directory=theirs)
    assert "MAC reservation directory" in str(info.value)
    assert "not private to this user (owner uid 65534" in str(info.value)
    assert os.listdir(theirs) == ["026b76010203"]  # nothing written into it


def test_mac_directory_is_per_user() -> None:
    from pytest_kvm.network import MAC_DIR

    assert MAC_DIR.name == f"pytest-kvm-macs-{os.getuid()}"


# -- remembered checksums (libvirt uploads) ---------------------------------------------


def _memo_name(path: Path) -> str:
    """The memo name an attacker can compute as well: (path, size, mtime) hashed."""
    st = path.stat()
    key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()
    return hashlib.sha256(key).hexdigest()[:32]


def _plant_sums_dirs(shared_tmp: Path) -> list[Path]:
    # Where the checksums were kept (one name for everybody) and where they are now
    # (one name per user): a stranger can make either before we do.
    dirs = [shared_tmp / "pytest-kvm-sums", shared_tmp / f"pytest-kvm-sums-{os.getuid()}"]
    for path in dirs:
        as_nobody("mkdir", "-m", "0777", str(path))
    return dirs


def test_checksum_memo_planted_by_another_user_is_not_believed(shared_tmp: Path, capsys) -> None:
    image = shared_tmp / "image.qcow2"
    image.write_bytes(b"the image" * 1000)
    truth = hashlib.sha256(image.read_bytes()).hexdigest()
    for directory in _plant_sums_dirs(shared_tmp):
        as_nobody("tee", str(directory / _memo_name(image)), stdin="0" * 64)
    assert file_sha256(image) == truth
    err = capsys.readouterr().err
    assert "checksum directory" in err and "not private to this user (owner uid 65534" in err
    assert "checksums are not remembered" in err


def test_checksum_memo_never_writes_through_a_planted_symlink(shared_tmp: Path) -> None:
    image = shared_tmp / "image.qcow2"
    image.write_bytes(b"another image" * 1000)
    victim = shared_tmp / "victim"
    victim.write_text("root's file\n")
    victim.chmod(0o644)
    truth = hashlib.sha256(image.read_bytes()).hexdigest()
    for directory in _plant_sums_dirs(shared_tmp):
        memo = directory / _memo_name(image)
        as_nobody("ln", "-s", str(victim), f"{memo}.{os.getpid()}")  # the old temp name
    assert file_sha256(image) == truth
    assert victim.read_text() == "root's file\n"


def test_checksums_are_remembered_privately(shared_tmp: Path) -> None:
    image = shared_tmp / "image.qcow2"
    image.write_bytes(b"a third image" * 1000)
    truth = hashlib.sha256(image.read_bytes()).hexdigest()
    assert file_sha256(image) == truth
    sums = shared_tmp / f"pytest-kvm-sums-{os.getuid()}"
    assert sums.stat().st_mode & 0o777 == 0o700
    memo = sums / _memo_name(image)
    assert memo.read_text() == truth and memo.stat().st_mode & 0o777 == 0o600
    # A memo that is no checksum (damaged, or a FIFO) is not used: computed anew.
    memo.write_text("garbage")
    assert file_sha256(image) == truth
    memo.unlink()
    os.mkfifo(memo)
    with deadline(5):
        assert file_sha256(image) == truth
