"""tpm=True without guests: QEMU's options, libvirt's XML, the template key, the
checks of bad values and a missing swtpm, swtpm's own lifecycle and its reaping."""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pytest_kvm import tpm
from pytest_kvm.backends.libvirt import domain_xml
from pytest_kvm.backends.qemu import build_argv
from pytest_kvm.config import resolve
from pytest_kvm.errors import GuestLaunchError, KvmConfigError
from pytest_kvm.guest.config import GuestConfig
from pytest_kvm.reaper import LEASE_DIR_ENV, Lease, lease_dir, leases, process_start, reap
from pytest_kvm.request import GuestRequest
from pytest_kvm.template import Shape, template_key
from tests.support.processes import dead_pid
from tests.support.specs import LIBVIRT_DISKS, opt, spec


def test_qemu_gets_a_tpm_crb_on_the_swtpm_socket(tmp_path):
    argv = build_argv(spec(tmp_path, tpm=True, tpm_socket=tmp_path / "tpm.sock"))
    assert f"socket,id=tpm0chr,path={tmp_path / 'tpm.sock'}" in opt(argv, "-chardev")
    assert opt(argv, "-tpmdev") == ["emulator,id=tpm0,chardev=tpm0chr"]
    assert "tpm-crb,tpmdev=tpm0" in opt(argv, "-device")
    assert "-tpmdev" not in build_argv(spec(tmp_path))
    with pytest.raises(GuestLaunchError, match="swtpm's socket"):
        build_argv(spec(tmp_path, tpm=True))


def test_libvirt_gets_an_emulated_tpm_2(tmp_path):
    root = ET.fromstring(domain_xml(spec(tmp_path, tpm=True), "d", "qemu", LIBVIRT_DISKS))
    (device,) = root.findall("devices/tpm")
    assert device.get("model") == "tpm-crb"
    backend = device.find("backend")
    assert backend is not None and backend.attrib == {"type": "emulator", "version": "2.0"}
    plain = ET.fromstring(domain_xml(spec(tmp_path), "d", "qemu", LIBVIRT_DISKS))
    assert plain.find("devices/tpm") is None


def test_the_template_key_has_tpm_only_when_it_is_on(tmp_path):
    from pytest_kvm.images import Image

    disk = tmp_path / "base.qcow2"
    disk.write_bytes(b"x")
    image = Image(name="base", path=disk, format="qcow2", source=str(disk))
    assert "tpm" not in Shape(1024, 2).key_fields()  # existing templates keep their keys
    assert Shape(1024, 2, tpm=True).key_fields()["tpm"] is True
    assert template_key(image, Shape(1024, 2, tpm=True), "tcg", "Q") != template_key(
        image, Shape(1024, 2), "tcg", "Q"
    )
    assert Shape(1024, 2, tpm=True).label().endswith("-tpm")


def test_tpm_option_sources_and_bad_values():
    def ini(key):
        return None

    assert resolve({"tpm": True}, {}, ini).tpm is True
    assert resolve({}, {"PYTEST_KVM_TPM": "yes"}, ini).tpm is True
    assert resolve({}, {}, ini).tpm is False
    with pytest.raises(KvmConfigError, match=r"environment PYTEST_KVM_TPM: 'tpm2' is not a bool"):
        resolve({}, {"PYTEST_KVM_TPM": "tpm2"}, ini)
    marked = resolve({}, {}, ini).with_marker({"tpm": True}, "t.py::x")
    assert marked.tpm is True
    with pytest.raises(KvmConfigError, match=r"t.py::x \(@pytest.mark.kvm tpm=\): 3"):
        resolve({}, {}, ini).with_marker({"tpm": 3}, "t.py::x")


def test_the_factory_takes_tpm_as_a_bool_only():
    settings = resolve({}, {}, lambda key: None)
    assert GuestRequest.build("t.py::x", tpm=True).shaped(settings).tpm is True
    assert GuestRequest.build("t.py::x").shaped(settings.with_marker({"tpm": True}, "m")).tpm
    assert (
        not GuestRequest.build("t.py::x", tpm=False)
        .shaped(settings.with_marker({"tpm": True}, "m"))
        .tpm
    )
    with pytest.raises(KvmConfigError) as info:
        GuestRequest.build("t.py::x: kvm_guest_factory", tpm="yes")  # type: ignore[arg-type]
    assert str(info.value) == ("t.py::x: kvm_guest_factory: tpm='yes' is not True, False or None")


def test_a_missing_swtpm_names_the_debian_package(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(KvmConfigError) as info:
        tpm.check_swtpm("t.py::x")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("t.py::x: tpm=True needs swtpm")
    assert "Debian package swtpm" in message


def test_libvirt_tpm_guests_boot_for_real(tmp_path):
    from pytest_kvm.images import Image

    disk = tmp_path / "base.qcow2"
    disk.write_bytes(b"x")
    image = Image(name="base", path=disk, format="qcow2", source=str(disk))
    assert GuestConfig(image, tpm=True).restore_refusal() == ""
    refusal = GuestConfig(image, tpm=True, backend="libvirt").restore_refusal()
    assert "TPM guests boot for real on the libvirt backend" in refusal
    assert GuestConfig(image, backend="libvirt").restore_refusal() == ""


needs_swtpm = pytest.mark.skipif(not tpm.swtpm_path(), reason="swtpm is not installed")


@needs_swtpm
def test_swtpm_runs_private_and_goes_with_close(tmp_path):
    seen: list[int] = []
    swtpm = tpm.Swtpm(tmp_path / "tpm", tmp_path / "tpm.sock", tmp_path / "swtpm.log")
    swtpm.start(10, on_spawn=seen.append)
    try:
        assert seen == [swtpm.pid] and swtpm.is_running()
        assert (tmp_path / "tpm").stat().st_mode & 0o777 == 0o700
        assert (tmp_path / "tpm.sock").stat().st_mode & 0o777 == 0o600
    finally:
        swtpm.close()
    assert not swtpm.is_running()
    assert not (tmp_path / "tpm").exists() and not (tmp_path / "tpm.sock").exists()
    swtpm.close()  # twice is fine


def test_swtpm_that_cannot_start_says_why(tmp_path, monkeypatch):
    fake = tmp_path / "bin"
    fake.mkdir()
    script = fake / "swtpm"
    script.write_text("#!/bin/sh\necho 'swtpm: no such thing' >&2\nexit 3\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake))
    swtpm = tpm.Swtpm(tmp_path / "tpm", tmp_path / "tpm.sock", tmp_path / "swtpm.log")
    with pytest.raises(GuestLaunchError, match=r"\(exit 3\): swtpm: no such thing"):
        swtpm.start(10)
    assert not (tmp_path / "tpm").exists()


@pytest.fixture
def book(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(LEASE_DIR_ENV, str(tmp_path / "leases"))
    return lease_dir()


@needs_swtpm
def test_reap_ends_a_dead_runs_swtpm_and_only_that(book: Path, tmp_path: Path) -> None:
    dead, dead_start = dead_pid()
    workdir = tmp_path / "pytest-kvm-r3-x" / "kvm-r3-main-01"
    workdir.mkdir(parents=True)
    swtpm = tpm.Swtpm(workdir / "tpm", tmp_path / "tpm.sock", tmp_path / "swtpm.log")
    swtpm.start(10)
    other = subprocess.Popen(["sleep", "60"])  # named as a swtpm: never killed
    try:
        pid = swtpm.pid
        assert pid is not None
        for stem, named in (("guest-a", pid), ("guest-b", other.pid)):
            Lease.create(book, stem, {
                "kind": "guest", "run_id": "r3", "name": "kvm-r3-main-01", "pid": dead,
                "pid_start": dead_start, "workdir": str(workdir),
                "tpm_pid": named, "tpm_start": process_start(named),
            })  # fmt: skip
        result = reap(directory=book)
        assert any(f"killed swtpm {pid}" in line for line in result.reaped), result.reaped
        assert not swtpm.is_running()
        assert other.poll() is None
        assert leases(book) == [] and not workdir.exists()
    finally:
        swtpm.close()
        other.kill()
        other.wait()
