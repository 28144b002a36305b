"""The libvirt backend against a real libvirtd, QEMU and guests.

The module always starts libvirtd and virtlogd of its own, in a network and mount
namespace of their own with a private socket (tests/integration/support/libvirtd.py), whether
or not a libvirtd runs on the host, and stops them afterwards. Inner runs go into that
namespace, where the guests' forwarded ports are, with PYTEST_KVM_URI and
LIBVIRT_DEFAULT_URI naming that daemon. The parity suite (parity_suite.py) runs there
on both backends.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_kvm import accel
from tests.integration.support.libvirtd import (
    SYSTEM_SOCKET,
    Libvirtd,
    Sshd,
    answers,
    missing,
    virsh,
)
from tests.support.processes import qemu_pids_under

HERE = Path(__file__).resolve().parent
SUPPORT = HERE / "support"
POOL_DIR = Path("/var/lib/libvirt/images/pytest-kvm")

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="starts libvirtd: run as root"),
    pytest.mark.skipif(bool(missing()), reason=missing() or "ok"),
]


@pytest.fixture(scope="module")
def libvirtd(tmp_path_factory) -> Iterator[Libvirtd]:
    daemon = Libvirtd(tmp_path_factory.mktemp("libvirtd"))
    with daemon, pytest.MonkeyPatch.context() as patch:
        # Inner runs, their virsh and ours: that daemon, not the system socket's.
        patch.setenv("PYTEST_KVM_URI", daemon.uri)
        patch.setenv("LIBVIRT_DEFAULT_URI", daemon.uri)
        yield daemon
    assert all(proc.poll() is not None for proc in daemon.procs) or not daemon.procs


def _virsh(*args: str) -> str:
    return virsh(*args, uri=os.environ["LIBVIRT_DEFAULT_URI"])


def _ours() -> list[str]:
    """Our domains (running), by name."""
    return [n for n in _virsh("list", "--name").split() if n.startswith("pytest-kvm-")]


def _guest_volumes() -> list[str]:
    """Volumes of guests (overlays, seeds) left in our pool; uploaded images excluded.
    No pool yet (a fresh host before the first libvirt run): no volumes. The pool's
    directory is the host's, shared with every pytest-kvm run on this machine: the
    volumes of runs that are still alive (by their leases) are theirs, not left over."""
    if "pytest-kvm" not in _virsh("pool-list", "--all", "--name").split():
        return []
    lines = _virsh("vol-list", "pytest-kvm").splitlines()
    names = [line.split()[0] for line in lines if line.split()[0].startswith("pytest-kvm-")]
    live = _live_run_ids()
    return [name for name in names if not any(f"-kvm-{run}-" in name for run in live)]


def _live_run_ids() -> set[str]:
    """The run ids of live pytest-kvm runs in the lease directory, this test's own
    (PYTEST_KVM_LEASE_DIR, if it set one) and the machine's."""
    from pytest_kvm.lease import LEASE_DIR_ENV, lease_dir, leases

    dirs = {lease_dir()}
    configured = os.environ.pop(LEASE_DIR_ENV, None)
    try:
        dirs.add(lease_dir())
    finally:
        if configured is not None:
            os.environ[LEASE_DIR_ENV] = configured
    return {
        str(lease.data["run_id"])
        for directory in dirs
        for lease in leases(directory)
        if lease.data.get("run_id") and lease.owner_alive
    }


def _pytest_argv(image_arg: str, cache_arg: str) -> list[str]:
    return [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", "-rA",
            f"--kvm-image={image_arg}", cache_arg]  # fmt: skip


def _inner(libvirtd, pytester, image_arg, cache_arg, *extra: str) -> list[str]:
    return libvirtd.wrap([*_pytest_argv(image_arg, cache_arg), *extra])


@pytest.mark.parametrize("backend", ["qemu", "libvirt", "libvirt-remote"])
def test_parity_suite_passes_on_both_backends(
    backend, libvirtd, pytester, image_arg, cache_arg, inner_env, monkeypatch, tmp_path
):
    """The same suite on the qemu backend, on local libvirt, and on libvirt "remote":
    qemu+ssh:// through an sshd on 127.0.0.1, guests reached through SSH jumps."""
    pytester.copy_example(str(HERE / "parity_suite.py"))
    pytester.copy_example(str(SUPPORT / "tiny_boot.py"))
    pytester.copy_example(str(HERE.parent / "support" / "identity.py"))
    monkeypatch.setenv("PKVM_EXPECT_BACKEND", backend.partition("-")[0])
    suite = str(pytester.path / "parity_suite.py")
    # A failed inner test leaves its console log and the domain XML here.
    artifacts = f"--kvm-artifacts={tmp_path / 'artifacts'}"
    with contextlib.ExitStack() as stack:
        if backend == "libvirt-remote":
            sshd = stack.enter_context(Sshd(libvirtd, tmp_path / "sshd"))
            monkeypatch.setenv("PKVM_EXPECT_JUMP", "root@127.0.0.1:22")
            # The remote host's accelerator is ours: say it (auto would trust libvirt's
            # capabilities, which offer KVM on a host whose KVM cannot run the guest).
            argv = libvirtd.wrap([
                sys.executable, str(SUPPORT / "in_overlay.py"), "/root", str(sshd.home.parent),
                "--", *_pytest_argv(image_arg, cache_arg), "--kvm-backend=libvirt",
                f"--kvm-uri={libvirtd.remote_uri}",
                f"--kvm-accel={accel.choose('auto').name}", artifacts, suite,
            ])  # fmt: skip
        else:
            argv = _inner(libvirtd, pytester, image_arg, cache_arg,
                          f"--kvm-backend={backend}", artifacts, suite)  # fmt: skip
        result = pytester.run(*argv, timeout=1800)
    result.assert_outcomes(passed=4)
    if backend != "qemu":
        # What each test's guest consumed, in its report.
        result.stdout.fnmatch_lines(
            ["*kvm resources: kvm-*", "cpu *.* s, peak memory * MiB, disk written *.* MiB"]
        )
    assert _ours() == []
    assert _guest_volumes() == []
    assert not qemu_pids_under(inner_env)
    assert list(inner_env.iterdir()) == []


def test_suite_daemon_ignores_a_host_daemon(libvirtd, tmp_path):
    """Whatever answers on the system socket (a host libvirtd; here a decoy that only
    accepts when none runs) is neither used nor touched: the suite's daemon has a
    socket of its own and starts all the same."""
    decoy = None
    if not answers(SYSTEM_SOCKET):
        SYSTEM_SOCKET.parent.mkdir(parents=True, exist_ok=True)
        SYSTEM_SOCKET.unlink(missing_ok=True)
        decoy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        decoy.bind(str(SYSTEM_SOCKET))
        decoy.listen(8)
    try:
        before = SYSTEM_SOCKET.stat()
        with Libvirtd(tmp_path / "second") as second:
            assert second.started and second.socket != SYSTEM_SOCKET
            assert "Running hypervisor: QEMU" in second.virsh("version")
            assert libvirtd.socket != SYSTEM_SOCKET and answers(libvirtd.socket)
        after = SYSTEM_SOCKET.stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
        if decoy is not None:  # nobody connected to it
            decoy.setblocking(False)
            with pytest.raises(BlockingIOError):
                decoy.accept()
    finally:
        if decoy is not None:
            decoy.close()
            SYSTEM_SOCKET.unlink()


def test_tcg_domain_gets_the_qemu_backends_cpu(libvirtd, tmp_path):
    """What libvirt runs for a TCG domain: the qemu backend's CPU model and topology
    (-cpu max, one socket of N cores), and multi-threaded TCG (QEMU's default for
    x86_64 on x86_64, which the qemu backend spells thread=multi)."""
    from pytest_kvm.backends.libvirt import domain_xml
    from pytest_kvm.backends.qemu import build_argv
    from tests.support.specs import opt, spec

    machine = spec(tmp_path, cpus=2)
    xml = tmp_path / "domain.xml"
    xml.write_text(domain_xml(machine, "pytest-kvm-cpu", "qemu", []))
    argv = shlex.split(libvirtd.virsh("domxml-to-native", "qemu-argv", "--xml", str(xml)))
    assert opt(argv, "-cpu") == opt(build_argv(machine), "-cpu") == ["max"]
    assert opt(argv, "-accel") == ["tcg"]
    count, *topology = opt(argv, "-smp")[0].split(",")
    assert count == "2"
    assert dict(item.split("=") for item in topology)["sockets"] == "1"
    assert dict(item.split("=") for item in topology)["cores"] == "2"


def test_calls_on_a_daemon_that_stops_answering_fail_in_bounded_time(libvirtd, monkeypatch):
    """A connection whose far end goes quiet (its libvirtd stopped, as a dead
    qemu+ssh link would look) makes calls fail with a clear error once keepalive
    gives up, instead of waiting forever."""
    import libvirt

    from pytest_kvm.backends.libvirt import connection as backend

    monkeypatch.setattr(backend, "KEEPALIVE", (1, 2), raising=False)  # dead in about 3 s
    uri = f"{libvirtd.uri}&keepalive-test"  # a connection of its own (one per URI)
    conn = backend.connect(uri)
    pid = int((libvirtd.workdir / "run" / "libvirtd.pid").read_text())
    outcome: list[str] = []

    def call() -> None:
        try:
            conn.listAllDomains(0)
            outcome.append("answered")
        except libvirt.libvirtError as exc:
            outcome.append(str(exc))

    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        caller = threading.Thread(target=call, daemon=True)
        caller.start()
        caller.join(30)
        elapsed = time.monotonic() - started
    finally:
        os.kill(pid, signal.SIGCONT)
        backend.forget_connection(uri, conn)
    assert outcome, "the call still waits after 30 s"
    assert "keepalive" in outcome[0] and elapsed < 15, (outcome, elapsed)


def test_image_is_uploaded_once_per_host(libvirtd, pytester, image_arg, cache_arg, inner_env):
    """Two runs, one upload: the image's volume is the same file, untouched."""
    # A domain that starts is enough: no need to wait for its SSH.
    pytester.makepyfile(
        test_one="def test_one(kvm_guest_factory):\n    kvm_guest_factory(ssh=False)\n"
    )
    argv = _inner(libvirtd, pytester, image_arg, cache_arg, "--kvm-backend=libvirt")
    pytester.run(*argv, timeout=900).assert_outcomes(passed=1)
    images = sorted(p for p in POOL_DIR.iterdir() if p.name.startswith("debian-12-"))
    assert [p.name for p in images if p.name.endswith(".ok")]  # the completion marker
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in images}
    pytester.run(*argv, timeout=900).assert_outcomes(passed=1)
    after = {
        p.name: (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in POOL_DIR.iterdir()
        if p.name.startswith("debian-12-")
    }
    assert after == before
    assert _guest_volumes() == []


def test_tpm_guest_gets_libvirts_swtpm(libvirtd, pytester, image_arg, cache_arg, inner_env):
    """tpm=True and firmware="uefi-secure" on libvirt: <tpm model='tpm-crb'> with the
    emulator backend, whose swtpm libvirt runs, and <os firmware='efi'> with Secure
    Boot; such guests boot for real (no TPM or UEFI templates on libvirt yet). Cheap:
    the guest kernel's lines a few seconds into the boot are enough: booted by EDK II
    (OVMF), Secure Boot on, the TPM's driver (IMA says "No TPM chip found" where there
    is none)."""
    pytester.makepyfile(
        test_tpm="""
def test_tpm(kvm_guest_factory):
    g = kvm_guest_factory(tpm=True, firmware="uefi-secure", ssh=False)
    assert g.template is None
    g.wait_for_console(r"efi: EFI v[0-9.]+ by EDK II", timeout=300)
    g.wait_for_console(r"Secure boot enabled", timeout=120)
    found = g.wait_for_console(r"tpm_crb MSFT0101|ima: No TPM chip found", timeout=300)
    assert found.group(0).startswith("tpm_crb"), found.group(0)
"""
    )
    argv = _inner(libvirtd, pytester, image_arg, cache_arg, "--kvm-backend=libvirt")
    result = pytester.run(*argv, timeout=900)
    result.assert_outcomes(passed=1)
    assert _ours() == []


def _private_leases(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Leases of the inner runs (and of the `reap` that follows) that no other
    pytest-kvm run on this machine reads: a run that starts while this test's killed
    inner run is dead, as any run's reaper should, would destroy its domain and
    volumes before this test looks at them."""
    monkeypatch.setenv("PYTEST_KVM_LEASE_DIR", str(tmp_path / "leases"))


INNER_KILLED = """
import os, time
from pathlib import Path

def test_hangs(kvm_guest_factory):
    guest = kvm_guest_factory(ssh=False)
    ready = Path(os.environ["PKVM_TEST_READY"])
    run = guest._run
    ready.with_suffix(".tmp").write_text(f"{guest.machine.domain_name}\\n{run.dir}\\n{run.sock_dir}")
    ready.with_suffix(".tmp").replace(ready)
    time.sleep(600)
"""


def test_domain_dies_with_the_run_that_made_it(
    libvirtd, pytester, image_arg, cache_arg, inner_env, tmp_path, monkeypatch
):
    """The domain is auto-destroyed when its connection closes: a SIGKILLed run
    leaves no running guest behind."""
    _private_leases(monkeypatch, tmp_path)
    ready = tmp_path / "ready"
    monkeypatch.setenv("PKVM_TEST_READY", str(ready))
    pytester.makepyfile(test_inner=INNER_KILLED)
    argv = _inner(libvirtd, pytester, image_arg, cache_arg, "--kvm-backend=libvirt")
    proc = subprocess.Popen(argv, cwd=pytester.path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 900
        while not ready.exists():
            assert proc.poll() is None, "the inner run ended before its guest was up"
            assert time.monotonic() < deadline
            time.sleep(1)
        name, *run_dirs = ready.read_text().splitlines()
        assert name in _ours()
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # ip netns exec execs: this is pytest itself
        proc.wait()
    deadline = time.monotonic() + 60
    while name in _ours() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert name not in _ours()
    # Its volumes stay until the next run on this machine starts, which removes them.
    assert [v for v in _guest_volumes() if v.startswith(name + ".")]
    pytester.makepyfile(test_inner="def test_nothing():\n    pass\n")
    pytester.run(*argv, timeout=300).assert_outcomes(passed=1)
    assert _guest_volumes() == []
    # A killed run's private directories stay until a reaper exists (issue 9).
    for path in run_dirs:
        shutil.rmtree(path, ignore_errors=True)


INNER_RESTORED = """
import os, time
from pathlib import Path

def test_hangs(kvm_guest_factory):
    guest = kvm_guest_factory()
    assert "restore" in guest.boot_timings  # from the template, not booted
    ready = Path(os.environ["PKVM_TEST_READY"])
    ready.with_suffix(".tmp").write_text(guest.machine.domain_name)
    ready.with_suffix(".tmp").replace(ready)
    time.sleep(600)
"""


def test_restored_domain_is_reaped_after_sigkill(
    libvirtd, pytester, image_arg, cache_arg, inner_env, tmp_path, monkeypatch
):
    """A domain restored from a template has no AUTODESTROY: it outlives a SIGKILLed
    run, and `pytest-kvm reap` destroys it (its lease names it) and deletes its
    volumes."""
    _private_leases(monkeypatch, tmp_path)
    ready = tmp_path / "ready"
    monkeypatch.setenv("PKVM_TEST_READY", str(ready))
    pytester.makepyfile(test_inner=INNER_RESTORED)
    argv = _inner(libvirtd, pytester, image_arg, cache_arg, "--kvm-backend=libvirt")
    proc = subprocess.Popen(argv, cwd=pytester.path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 1500
        while not ready.exists():
            assert proc.poll() is None, "the inner run ended before its guest was up"
            assert time.monotonic() < deadline
            time.sleep(1)
        name = ready.read_text()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    time.sleep(3)
    assert name in _ours()  # not auto-destroyed with its connection
    assert [v for v in _guest_volumes() if v.startswith(name + ".")]
    reaped = subprocess.run(
        libvirtd.wrap([sys.executable, "-m", "pytest_kvm.cli", "reap"]),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert reaped.returncode == 0, reaped.stderr
    assert f"destroyed domain {name}" in reaped.stdout, reaped.stdout
    assert name not in _ours()
    assert [v for v in _guest_volumes() if v.startswith(name + ".")] == []


def _usage_error(result) -> str:
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str() + result.stderr.str()
    return result.stderr.str()


def test_bad_uris_and_pools_are_clear_errors(libvirtd, pytester, image_arg, cache_arg, tmp_path):
    pytester.makepyfile(test_one="def test_one(kvm_guest):\n    pass\n")
    base = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--kvm-image={image_arg}",
            cache_arg, "--kvm-backend=libvirt"]  # fmt: skip

    # Not QEMU: libvirt's built-in test driver.
    err = _usage_error(pytester.run(*base, "--kvm-uri=test:///default"))
    assert "--kvm-uri test:///default: that hypervisor is TEST, not QEMU" in err

    # Nothing answers on that socket.
    uri = f"qemu+unix:///system?socket={tmp_path}/no-daemon.sock"
    err = _usage_error(pytester.run(*base, f"--kvm-uri={uri}"))
    assert f"--kvm-uri {uri}: cannot connect" in err
    assert "is libvirtd running there?" in err

    # A pool that does not exist.
    err = _usage_error(pytester.run(*base, "--kvm-pool=no-such-pool"))
    assert f"--kvm-uri {libvirtd.uri}: storage pool 'no-such-pool' does not exist" in err

    # A malformed URI.
    err = _usage_error(pytester.run(*base, "--kvm-uri=qemu:///nowhere"))
    assert "--kvm-uri qemu:///nowhere: cannot connect" in err

    # A remote hypervisor without SSH: its guests could not be reached.
    err = _usage_error(pytester.run(*base, "--kvm-uri=qemu+tcp://127.0.0.1:1/system"))
    assert "use qemu+ssh://USER@HOST/system" in err

    # An SSH host nobody listens on.
    err = _usage_error(pytester.run(*base, "--kvm-uri=qemu+ssh://root@127.0.0.1:1/system"))
    assert "--kvm-uri qemu+ssh://root@127.0.0.1:1/system: cannot connect" in err

    # Not a URI at all.
    err = _usage_error(pytester.run(*base, "--kvm-uri=system"))
    assert "'system' is not a libvirt URI" in err


def test_system_uri_without_permission_is_a_clear_error(libvirtd, image_arg):
    """An unprivileged user on a root-only system socket: told what to do, not a
    traceback."""
    where = Path(tempfile.mkdtemp(prefix="pkvm-unpriv-"))  # pytest's tmp is root-only
    try:
        os.chmod(where, 0o777)
        (where / "test_one.py").write_text("def test_one(kvm_guest):\n    pass\n")
        argv = [
            "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--",
            sys.executable, "-m", "pytest", "-p", "no:cacheprovider", str(where),
            f"--kvm-image={image_arg}", "--kvm-backend=libvirt", f"--kvm-uri={libvirtd.uri}",
            f"--kvm-cache={where / 'cache'}",
        ]  # fmt: skip
        env = {**os.environ, "HOME": str(where)}
        proc = subprocess.run(argv, cwd=where, env=env, capture_output=True, text=True,
                              timeout=120)  # fmt: skip
    finally:
        shutil.rmtree(where)
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR, proc.stdout + proc.stderr
    assert f"--kvm-uri {libvirtd.uri}: cannot connect" in proc.stderr
    assert "you may not use it" in proc.stderr


INNER_NETWORKS = """
import pytest, subprocess
from pytest_kvm.errors import KvmConfigError


def _leased(network, mac):
    out = subprocess.run(["virsh", "-q", "net-dhcp-leases", network],  # LIBVIRT_DEFAULT_URI
                         capture_output=True, text=True, check=True).stdout
    return [line.split()[4].split("/")[0] for line in out.splitlines() if mac in line]


def _record_mac(g):
    with open(__import__("os").environ["PKVM_TEST_MACS"], "a") as out:
        out.write(g.mac.replace(":", "") + "\\n")


@pytest.mark.kvm(network="libvirt=default")
def test_nat(kvm_guest):
    g = kvm_guest
    _record_mac(g)
    assert g.address.startswith("192.168.122.")
    assert _leased("default", g.mac) == [g.address]
    assert g.address in g.succeed("ip -4 -o addr")
    # The network's own side answers (libvirt's dnsmasq serves DNS on it).
    g.succeed("timeout 10 bash -c '</dev/tcp/192.168.122.1/53'")
    with pytest.raises(KvmConfigError, match="forwarding is for user networking"):
        g.forward_port(80)
    assert g.ssh_command.endswith(f"root@{g.address}")


@pytest.mark.kvm(network="bridge=br0")
def test_bridge(kvm_guest):
    g = kvm_guest
    _record_mac(g)
    assert g.address.startswith("10.77.0.")
    assert g.address in g.succeed("ip -4 -o addr")
    leases = open(__import__("os").environ["PKVM_TEST_LEASES"]).read()
    assert f"{g.mac} {g.address}" in leases
"""


def test_libvirt_nat_network_and_bridge(
    libvirtd, pytester, image_arg, cache_arg, inner_env, tmp_path, monkeypatch
):
    """libvirt's own NAT network ("default", started in the daemon's namespace) and a
    bridge with a DHCP server there: guests get addresses from them, reached directly."""
    from pytest_kvm.network import MAC_DIR
    from tests.integration.support.netns import BridgeNetns

    _virsh("net-start", "default")
    bridge = BridgeNetns(tmp_path / "bridge", netns=libvirtd.netns)
    bridge.workdir.mkdir()
    macs = tmp_path / "macs"
    monkeypatch.setenv("PKVM_TEST_MACS", str(macs))
    try:
        with bridge:
            monkeypatch.setenv("PKVM_TEST_LEASES", str(bridge.leases))
            pytester.makepyfile(test_inner=INNER_NETWORKS)
            # A guest boots in about 45 s here: one that cannot be reached fails with
            # what it saw after 100 s (x3 under TCG), well inside the run's limit.
            argv = _inner(libvirtd, pytester, image_arg, cache_arg, "--kvm-backend=libvirt",
                          "--kvm-boot-timeout=100")  # fmt: skip
            result = pytester.run(*argv, timeout=1500)
            result.assert_outcomes(passed=2)
            # libvirt's taps are gone with the domains.
            assert bridge.ports() == ["veth0"]
            assert [link for link in bridge.links() if link.startswith("vnet")] == []
    finally:
        _virsh("net-destroy", "default")
    assert _ours() == [] and _guest_volumes() == []
    # The guests' MAC reservations are gone (other runs' may come and go meanwhile).
    mine = macs.read_text().split()
    assert len(mine) == 2 and not [mac for mac in mine if (MAC_DIR / mac).exists()]


INNER_SPREAD = """
import os, json


def test_record(kvm_guest_factory):
    g = kvm_guest_factory(ssh=False)
    line = json.dumps([os.environ["PYTEST_XDIST_WORKER"], g.machine.target.uri])
    with open(os.environ["PKVM_TEST_RECORD"], "a") as out:
        out.write(line + "\\n")
"""


def test_uris_are_spread_over_xdist_workers(
    libvirtd, pytester, image_arg, cache_arg, inner_env, tmp_path, monkeypatch
):
    """--kvm-uri twice with -n 2: worker gw0 runs its guests on the first URI, gw1 on
    the second (here the same libvirtd, once through SSH)."""
    record = tmp_path / "record.jsonl"
    monkeypatch.setenv("PKVM_TEST_RECORD", str(record))
    pytester.makepyfile(test_a=INNER_SPREAD, test_b=INNER_SPREAD)  # one file per worker
    remote = libvirtd.remote_uri
    with Sshd(libvirtd, tmp_path / "sshd") as sshd:
        argv = libvirtd.wrap([
            sys.executable, str(SUPPORT / "in_overlay.py"), "/root", str(sshd.home.parent),
            "--", *_pytest_argv(image_arg, cache_arg), "--kvm-backend=libvirt",
            f"--kvm-uri={libvirtd.uri}", f"--kvm-uri={remote}", "-n", "2",
            "--dist=loadfile", f"--kvm-accel={accel.choose('auto').name}",
            str(pytester.path),
        ])  # fmt: skip
        result = pytester.run(*argv, timeout=900)
    result.assert_outcomes(passed=2)
    seen = dict(json.loads(line) for line in record.read_text().splitlines())
    assert seen == {"gw0": libvirtd.uri, "gw1": remote}
    assert _ours() == [] and _guest_volumes() == []


INNER_SHARE = """
import os
from pathlib import Path

from pytest_kvm.share import Share


def test_share(kvm_guest_factory):
    data, out = Path(os.environ["PKVM_SHARE_DATA"]), Path(os.environ["PKVM_SHARE_OUT"])
    g = kvm_guest_factory(share={data: "/mnt/data", out: Share("/mnt/out", rw=True)})
    assert "restore" in g.boot_timings  # a restored domain: its XML got the devices
    assert g.succeed("cat /mnt/data/host.txt") == "from the host\\n"
    g.fail("touch /mnt/data/new")
    g.succeed("echo from the guest > /mnt/out/guest.txt")
    assert (out / "guest.txt").read_text() == "from the guest\\n"
"""


def test_share_on_a_restored_domain(libvirtd, pytester, image_arg, cache_arg, inner_env):
    """share= on libvirt: the restored domain's XML gets the 9p <filesystem>s; QEMU
    runs as libvirt's QEMU user, so the folders are ones it may read (and write)."""
    base = Path(tempfile.mkdtemp(prefix="pytest-kvm-share-", dir="/var/tmp"))
    try:
        base.chmod(0o755)
        data, out = base / "data", base / "out"
        data.mkdir(mode=0o755)
        out.mkdir()
        out.chmod(0o777)
        (data / "host.txt").write_text("from the host\n")
        (data / "host.txt").chmod(0o644)
        pytester.makepyfile(test_inner=INNER_SHARE)
        argv = _inner(libvirtd, pytester, image_arg, cache_arg, "--kvm-backend=libvirt")
        env = {"PKVM_SHARE_DATA": str(data), "PKVM_SHARE_OUT": str(out)}
        with pytest.MonkeyPatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            result = pytester.run(*argv, timeout=900)
        result.assert_outcomes(passed=1)
        assert sorted(p.name for p in data.iterdir()) == ["host.txt"]
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_template_prune_removes_only_stale_copies_from_the_pool(libvirtd, tmp_path):
    """``pytest-kvm template prune`` on a real pool of that daemon (a pool of its own,
    small volumes named like real uploads, no guest): the stale copy and the dead
    uploader's half upload go; what a template of the cache has, what a defined (not
    started) domain names, what a live guest's overlay is backed by, a live uploader's
    half upload and another host's copy stay."""
    import libvirt

    from pytest_kvm.backends.libvirt.storage import HOST_TAG, volume_xml
    from tests.support.templates import base_image, make_template

    cache = tmp_path / "cache"
    made = make_template(cache / "templates", base_image(tmp_path), name="t1")
    state_sha = hashlib.sha256((made / "state").read_bytes()).hexdigest()[:20]
    dead = subprocess.Popen(["true"])
    dead.wait()
    other = "0" * 6 if HOST_TAG != "0" * 6 else "1" * 6

    def name(kind: str, sha: str = "", pid: int = 1, host: str = HOST_TAG) -> str:
        ext = "save" if kind == "state" else "qcow2"
        return f"{kind}-{sha or secrets.token_hex(10)}.up-h{host}.p{pid}.0a0b0c0d.{ext}"

    of_template, of_domain, stale = name("state", state_sha), name("state"), name("disk")
    foreign, dead_half = name("state", host=other), name("state", pid=dead.pid)
    live_half = name("disk", pid=os.getpid())
    # A live guest's overlay (this process's) backed by a disk copy: the copy stays.
    backing, overlay = name("disk"), f"pytest-kvm-prune.h{HOST_TAG}.p{os.getpid()}.0.qcow2"
    complete = (of_template, of_domain, stale, foreign, backing)
    pool_name, domain = f"pytest-kvm-prune-{secrets.token_hex(3)}", "pytest-kvm-prune-domain"
    pool_dir = tmp_path / "pool"
    pool_dir.mkdir()
    conn = libvirt.open(libvirtd.uri)
    pool = conn.storagePoolCreateXML(
        f"<pool type='dir'><name>{pool_name}</name><target><path>{pool_dir}</path></target></pool>",
        0,
    )
    try:
        for vol in (*complete, *(f"{v}.ok" for v in complete), dead_half, live_half):
            pool.createXML(volume_xml(vol, 4096, "qcow2" if vol == backing else "raw"), 0)
        below = pool.storageVolLookupByName(backing).path()
        pool.createXML(volume_xml(overlay, 1 << 20, "qcow2", below), 0)
        conn.defineXML(
            f"<domain type='qemu'><name>{domain}</name><memory unit='MiB'>64</memory>"
            "<os><type arch='x86_64'>hvm</type></os><devices><disk type='volume' device='disk'>"
            f"<driver name='qemu' type='raw'/><source pool='{pool_name}' volume='{of_domain}'/>"
            "<target dev='vda' bus='virtio'/></disk></devices></domain>"
        )
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "pytest_kvm.cli", "--cache", str(cache), "template", "prune",
             "--uri", libvirtd.uri, "--pool", pool_name],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert time.monotonic() - started < 30
        left = {vol.name() for vol in pool.listAllVolumes(0)}
        stay = (of_template, of_domain, foreign, backing)
        assert left == {*stay, *(f"{v}.ok" for v in stay), live_half, overlay}, proc.stdout
        at = f"pool {pool_name!r} at {libvirtd.uri}"
        assert f"removed volume {stale} from {at}: no template in the cache" in proc.stdout
        assert f"removed volume {dead_half} from {at}: left by a run" in proc.stdout
        assert f"kept volume {of_template} in {at}: template t1 in the cache uses it" in proc.stdout
        assert f"kept volume {of_domain} in {at}: in use: domain {domain}" in proc.stdout
        assert f"kept volume {foreign} in {at}: uploaded from another host" in proc.stdout
        assert f"kept volume {live_half} in {at}: being uploaded by process" in proc.stdout
        assert f"kept volume {backing} in {at}: in use: volume {overlay} is backed" in proc.stdout
        assert made.exists()
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.lookupByName(domain).undefine()
        for vol in pool.listAllVolumes(0):
            vol.delete(0)
        pool.destroy()
        conn.close()
