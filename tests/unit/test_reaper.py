"""Leases and reaping, with real processes standing in for runs and QEMU."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_kvm.backends.libvirt import domain_is_the_leases
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
from tests.support.processes import dead_pid


@pytest.fixture
def book(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "leases"
    monkeypatch.setenv(LEASE_DIR_ENV, str(directory))
    return lease_dir()


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
    pid, start = dead_pid()
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
    dead, dead_start = dead_pid()
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
    dead, dead_start = dead_pid()
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
    dead, dead_start = dead_pid()
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
    dead, dead_start = dead_pid()
    precious = tmp_path / "home-of-someone"
    precious.mkdir()
    Lease.create(book, "run-evil", {"kind": "run", "run_id": "e", "pid": dead,
                                    "pid_start": dead_start, "dir": str(precious)})  # fmt: skip
    reap(directory=book)
    assert precious.exists()
    assert leases(book) == []


def test_cli_reap_dry_run_lists_and_removes_nothing(book: Path, tmp_path: Path) -> None:
    dead, dead_start = dead_pid()
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


# -- runs elsewhere: other hosts, boots, containers sharing the lease directory ---------


def _fake_qemu(name: str) -> subprocess.Popen[bytes]:
    """A live process that looks like the QEMU of guest ``name`` (its argv)."""
    return subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "-name", f"guest={name},x"]
    )


@pytest.mark.parametrize(
    ("key", "value"),
    [("host", "another-host"), ("boot_id", "0-another-boot"), ("pidns", "pid:[1]")],
)
def test_a_lease_written_elsewhere_is_never_reaped(book: Path, tmp_path: Path, key, value):
    """A run in another container or host sharing the lease directory: its PID means
    nothing here (here it is dead), so nothing it names is touched, only reported."""
    dead, dead_start = dead_pid()
    workdir = tmp_path / "pytest-kvm-r3-x" / "kvm-r3-main-01"
    workdir.mkdir(parents=True)
    qemu = _fake_qemu("kvm-r3-main-01")
    try:
        lease = Lease.create(book, "guest-r3", {
            "kind": "guest", "run_id": "r3", "name": "kvm-r3-main-01", **owner_fields(),
            "pid": dead, "pid_start": dead_start, key: value, "workdir": str(workdir),
            "qemu_pid": qemu.pid, "qemu_start": process_start(qemu.pid),
        })  # fmt: skip
        result = reap(directory=book, include_kept=True)
        assert result.reaped == []
        assert len(result.foreign) == 1 and value in result.foreign[0]
        assert workdir.exists() and lease.path.exists()
        assert qemu.poll() is None
        env = {**os.environ, LEASE_DIR_ENV: str(book)}
        cli = subprocess.run([sys.executable, "-m", "pytest_kvm.cli", "reap"],
                             capture_output=True, text=True, env=env)  # fmt: skip
        assert "left alone (another host or container): guest kvm-r3-main-01" in cli.stdout
        assert workdir.exists() and qemu.poll() is None
    finally:
        qemu.kill()
        qemu.wait()


def test_leases_record_where_their_pids_mean_something(book: Path) -> None:
    fields = owner_fields()
    assert fields["host"] == socket.gethostname()
    assert fields["boot_id"] == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert fields["pidns"] == os.readlink("/proc/self/ns/pid")
    lease = Lease.create(book, "run-here", {"kind": "run", **fields})
    assert lease.foreign == "" and lease.owner_alive


def test_a_domain_is_destroyed_only_if_its_labels_name_the_leases_run(tmp_path: Path):
    from pytest_kvm.backends.libvirt import domain_xml
    from tests.support.specs import LIBVIRT_DISKS as DISKS
    from tests.support.specs import libvirt_spec as spec

    def xml(run: str, pid: str, host: str) -> str:
        labels = (("run", run), ("worker", "main"), ("pid", pid), ("host", host))
        return domain_xml(spec(tmp_path), "pytest-kvm-x", "qemu", DISKS, labels)

    lease = {"run_id": "0123456789abcdef", "pid": 4242, "host": "h1"}
    assert domain_is_the_leases(xml("0123456789abcdef", "4242", "h1"), lease)
    assert not domain_is_the_leases(xml("0123456789abcdef", "4243", "h1"), lease)
    assert not domain_is_the_leases(xml("0123456789abcdef", "4242", "h2"), lease)
    assert not domain_is_the_leases(xml("0123456789abcdee", "4242", "h1"), lease)
    assert not domain_is_the_leases("<domain><name>x</name></domain>", lease)
    assert not domain_is_the_leases(xml("0123456789abcdef", "4242", "h1"), {"run_id": "x"})


def test_runs_whose_ids_start_alike_never_share_names_or_leases(
    book: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs (same worker label) whose random ids share their first 32 bits, the
    part shown in short names: their leases, guests and domains stay apart."""
    from pytest_kvm.accel import AccelChoice
    from pytest_kvm.backends import load_backend
    from pytest_kvm.config import Settings
    from pytest_kvm.guest import Guest, GuestConfig
    from pytest_kvm.images import Image
    from pytest_kvm.run import RunContext

    monkeypatch.setenv("PYTEST_KVM_RUNTIME_DIR", str(tmp_path))
    real, tails = secrets.token_hex, iter(["89abcdef", "76543210"])

    def token_hex(n: int) -> str:  # run ids (2 bytes before, 8 now); anything else: real
        return ("01234567" + next(tails))[: 2 * n] if n in (2, 8) else real(n)

    monkeypatch.setattr("secrets.token_hex", token_hex)
    runs = [RunContext(AccelChoice("tcg", "test")) for _ in range(2)]
    try:
        assert [len(run.identity.run_id) for run in runs] == [16, 16]  # 64 bits
        assert runs[0].identity.run_id != runs[1].identity.run_id
        image = Image("img", Path("/nonexistent.qcow2"), "qcow2", "img")
        runner = load_backend("libvirt", Settings(backend="libvirt", uri="qemu:///system"))
        config = GuestConfig(image=image, backend="libvirt", runner=runner)
        guests = [Guest(run, config) for run in runs]
        assert guests[0].name != guests[1].name
        domains = {f"pytest-kvm-{guest.name}" for guest in guests}  # see LibvirtMachine
        assert len(domains) == 2
        for run, guest in zip(runs, guests, strict=True):
            run.guest_lease(guest.name)
        assert len(leases(book)) == 4  # two run leases, two guest leases: none overwritten
        assert {lease.data["run_id"] for lease in leases(book)} == {
            run.identity.run_id for run in runs
        }
    finally:
        for run in runs:
            run.close()


def test_run_ids_are_64_bits() -> None:
    from pytest_kvm.network import Identity

    ids = {Identity().run_id for _ in range(100)}
    assert len(ids) == 100 and all(len(i) == 16 and int(i, 16) >= 0 for i in ids)


# -- qemu-nbd (a decrypted view of an encrypted disk) ---------------------------------

NBD_OWNER = """
import sys, time
from pathlib import Path
from pytest_kvm.customize import DiskSource, _NbdExport
from tests.support.processes import dead_pid

if sys.argv[3] == "lost-signal":  # as if the parent-death signal never came
    import pytest_kvm.spawn
    pytest_kvm.spawn._die_with_parent = lambda: None
source = DiskSource(Path(sys.argv[1]), "qcow2", (True,), Path(sys.argv[2]))
export = _NbdExport(source, readonly=True)
export.start()
print(export.proc.pid, flush=True)
time.sleep(300)
"""


@pytest.fixture(scope="module")
def encrypted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A LUKS-encrypted qcow2 and its key (made once: LUKS' set-up costs seconds)."""
    from pytest_kvm.images.overlay import encrypt_image

    tmp_path = tmp_path_factory.mktemp("encrypted")
    key = tmp_path / "key"
    key.write_bytes(b"k3y")
    key.chmod(0o600)
    plain = tmp_path / "plain.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(plain), "1M"], check=True)
    return encrypt_image(plain, "qcow2", tmp_path / "enc.qcow2", key, iter_time_ms=10), key


def _killed_nbd_owner(book: Path, encrypted: tuple[Path, Path], mode: str) -> tuple[int, Lease]:
    """Start qemu-nbd from a process, SIGKILL that process; the qemu-nbd PID and lease."""
    env = {**os.environ, LEASE_DIR_ENV: str(book)}
    owner = subprocess.Popen(
        [sys.executable, "-c", NBD_OWNER, str(encrypted[0]), str(encrypted[1]), mode],
        stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    assert owner.stdout is not None
    nbd = 0
    try:
        nbd = int(owner.stdout.readline())
        found = [lease for lease in leases(book) if lease.kind == "nbd"]
        assert len(found) == 1, "qemu-nbd has no lease"
        assert found[0].data["qemu_pid"] == nbd and found[0].data["pid"] == owner.pid
    except BaseException:
        if nbd:
            os.kill(nbd, signal.SIGKILL)  # nothing else would end it
        raise
    finally:
        owner.kill()
        owner.wait()
    return nbd, found[0]


def _gone(pid: int, start: int | None, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while process_alive(pid, start) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not process_alive(pid, start)


def test_qemu_nbd_dies_with_its_owner(book: Path, encrypted) -> None:
    nbd, lease = _killed_nbd_owner(book, encrypted, "normal")
    start = lease.data["qemu_start"]
    try:
        assert _gone(nbd, start), "qemu-nbd outlived the process that started it"
        result = reap(directory=book)
        assert len(result.reaped) == 1 and not Path(lease.data["dir"]).exists()
        assert leases(book) == []
    finally:
        if process_alive(nbd, start):
            os.kill(nbd, signal.SIGKILL)


def test_reap_ends_the_qemu_nbd_of_a_dead_owner(book: Path, encrypted) -> None:
    nbd, lease = _killed_nbd_owner(book, encrypted, "lost-signal")
    start = lease.data["qemu_start"]
    try:
        assert process_alive(nbd, start)  # still serving the disk, decrypted
        result = reap(directory=book)
        assert _gone(nbd, start)
        assert len(result.reaped) == 1 and f"killed qemu-nbd {nbd}" in result.reaped[0]
        assert not Path(lease.data["dir"]).exists() and leases(book) == []
    finally:
        if process_alive(nbd, start):
            os.kill(nbd, signal.SIGKILL)
