"""An emulated TPM 2.0 per guest (``tpm=True``) with real guests: the guest's kernel
finds it; a template carries its TPM state into every clone, each a copy of its own;
swtpm and its state go with the guest, and a killed run's are ended by the reaper.

All guests here are restored from one TPM template (built once per cache) and one
prepared snapshot over it. It is a UEFI one, test_firmware.py's (firmware="uefi"): one
template's boot for both files; nothing here depends on the firmware (the debug PCR 16
is the guest's alone under OVMF as under SeaBIOS). The guest image has no tpm2-tools: a
TPM command is written to /dev/tpm0 as raw bytes, and PCRs are read from the kernel's
sysfs."""

from __future__ import annotations

import hashlib
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_kvm.snapshot import define
from pytest_kvm.util import process_alive, process_argv
from tests.integration.support.inner import InnerRuns, leases_under

pytestmark = pytest.mark.kvm(tpm=True, firmware="uefi")

PCR = 16  # the debug PCR: extendable by anyone, reset only by a TPM restart
ZEROS = "00" * 32


def extend_command(pcr: int, digest: bytes) -> bytes:
    """TPM2_PCR_Extend of ``pcr`` with one SHA-256 ``digest``, empty password session."""
    auth = (0x40000009).to_bytes(4, "big") + b"\0\0" + b"\0" + b"\0\0"  # TPM_RS_PW
    body = (
        pcr.to_bytes(4, "big")
        + len(auth).to_bytes(4, "big")
        + auth
        + (1).to_bytes(4, "big")  # TPML_DIGEST_VALUES.count
        + (0x000B).to_bytes(2, "big")  # TPM_ALG_SHA256
        + digest
    )
    size = 2 + 4 + 4 + len(body)
    return (0x8002).to_bytes(2, "big") + size.to_bytes(4, "big") + (0x182).to_bytes(4, "big") + body


def extend(guest, pcr: int, data: bytes) -> str:
    """Extend ``pcr`` in the guest's TPM by sha256(``data``), as a user without
    tpm2-tools would: raw bytes written to /dev/tpm0; returns the PCR's new value."""
    command = "".join(
        f"\\{byte:03o}" for byte in extend_command(pcr, hashlib.sha256(data).digest())
    )
    reply = guest.succeed(
        f"exec 3<>/dev/tpm0 && printf {shlex.quote(command)} >&3 && "
        "dd bs=4096 count=1 <&3 2>/dev/null | od -An -tx1"
    ).split()
    assert reply[6:10] == ["00", "00", "00", "00"], f"TPM answered {' '.join(reply)}"
    return pcr_value(guest, pcr)


def pcr_value(guest, pcr: int) -> str:
    return guest.succeed(f"cat /sys/class/tpm/tpm0/pcr-sha256/{pcr}").strip().lower()


def extended(value: str, data: bytes) -> str:
    """What a PCR holding ``value`` holds after extending it by sha256(``data``)."""
    return hashlib.sha256(bytes.fromhex(value) + hashlib.sha256(data).digest()).hexdigest()


def swtpm_of(workdir: Path) -> list[int]:
    """PIDs of swtpm processes whose state dir is in ``workdir``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        argv = process_argv(int(entry.name)) or [b""]
        if argv[0].endswith(b"swtpm") and f"dir={workdir}/".encode() in b"\0".join(argv):
            found.append(int(entry.name))
    return found


def measure(guest):
    """A prepared snapshot's setup: something measured into the TPM before the save."""
    extend(guest, PCR, b"prepared")


MEASURED = define("it-tpm-measured", measure)


def test_a_restored_guest_has_its_own_tpm_and_swtpm_goes_with_it(kvm_guest_factory):
    g = kvm_guest_factory()
    assert g.template is not None and g.template.shape.tpm, "not restored from a TPM template"
    assert g.succeed("cat /sys/class/tpm/tpm0/tpm_version_major").strip() == "2"
    g.succeed("test -c /dev/tpm0 && test -c /dev/tpmrm0")
    # The restored TPM answers commands, and remembers their effect.
    before = pcr_value(g, PCR)
    assert extend(g, PCR, b"hello") == extended(before, b"hello")
    # Its swtpm: private state dir and socket, ended with the guest, by PID.
    assert g.workdir is not None
    pids = swtpm_of(g.workdir)
    assert len(pids) == 1, pids
    state = g.workdir / "tpm"
    assert state.stat().st_mode & 0o777 == 0o700
    ctrl = next(a for a in process_argv(pids[0]) or [] if a.startswith(b"type=unixio,"))
    socket = Path(ctrl.split(b"path=")[1].split(b",")[0].decode())
    assert socket.stat().st_mode & 0o777 == 0o600
    g.close()
    assert not swtpm_of(g.workdir)
    assert not any(os.path.exists(f"/proc/{pid}") for pid in pids)
    assert not state.exists()
    assert not socket.exists()


def test_clones_get_the_saved_tpm_state_each_a_copy_of_its_own(kvm_guest_factory):
    """The snapshot's setup extended a PCR before the save: both clones start with
    that value (the TPM's state is in the saved state); one extends again, the other
    does not see it."""
    a = kvm_guest_factory(image=MEASURED)
    b = kvm_guest_factory(image=MEASURED)
    prepared = extended(ZEROS, b"prepared")
    assert pcr_value(a, PCR) == prepared
    assert pcr_value(b, PCR) == prepared
    assert extend(a, PCR, b"only in a") == extended(prepared, b"only in a")
    assert pcr_value(b, PCR) == prepared
    # Nor does a later clone: the template's TPM state was not written either.
    c = kvm_guest_factory(image=MEASURED)
    assert pcr_value(c, PCR) == prepared


HOLD = """
import os, time, pytest

def test_hold(kvm_guest):
    kvm_guest.succeed("test -c /dev/tpm0")
    open("held", "w").close()
    deadline = time.monotonic() + 300
    while not os.path.exists("go") and time.monotonic() < deadline:
        time.sleep(0.1)
"""


def test_a_killed_runs_swtpm_is_ended_by_the_reaper(
    pytester, inner_env, image_arg, cache_arg, tmp_path, monkeypatch
):
    """SIGKILL a run whose guest may be kept (--kvm-keep-on-failure: QEMU and swtpm
    have no parent-death signal): its swtpm runs on, named in the guest's lease, and
    `pytest-kvm reap` ends it and removes its state."""
    leases = tmp_path / "leases"
    monkeypatch.setenv("PYTEST_KVM_LEASE_DIR", str(leases))  # this run's and reap's
    pytester.makepyfile(test_it=HOLD)
    runs = InnerRuns(pytester, inner_env, [f"--kvm-image={image_arg}", cache_arg])
    try:
        proc = runs.start("--kvm-tpm", "--kvm-firmware=uefi", "--kvm-keep-on-failure")
        deadline = time.monotonic() + 600
        while not (pytester.path / "held").exists():
            assert proc.poll() is None, runs.output(proc)[-3000:]
            assert time.monotonic() < deadline, "the inner test never held its guest"
            time.sleep(0.2)
        (lease,) = [item for item in leases_under(inner_env) if item.kind == "guest"]
        pid, start = lease.data["tpm_pid"], lease.data["tpm_start"]
        workdir = Path(lease.data["workdir"])
        assert swtpm_of(workdir) == [pid]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        time.sleep(1)
        assert process_alive(pid, start), "swtpm died with the run: nothing left to reap"
        reaped = subprocess.run(
            [sys.executable, "-m", "pytest_kvm.cli", "reap"], capture_output=True, text=True
        )
        assert reaped.returncode == 0, reaped.stderr
        assert f"killed swtpm {pid}" in reaped.stdout, reaped.stdout
        assert not process_alive(pid, start)
        assert not workdir.exists()
        assert not lease.path.exists()
    finally:
        runs.stop()
