"""``pytest-kvm doctor``: what it finds, what it tells to install, its exit status."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pytest_kvm import cli, doctor, firmware
from pytest_kvm.accel import AccelChoice
from pytest_kvm.errors import KvmConfigError
from pytest_kvm.images import builder, mirror
from pytest_kvm.images.store import catalog_path

PVM = (
    "/dev/kvm is provided by kvm_pvm (a PVM hypervisor), which runs only PVM-enabled "
    "guest kernels: a standard distribution kernel triple-faults under it"
)
ROOT = Path(__file__).resolve().parents[2]


class Machine:
    """A fake machine for the doctor: which tools exist and what they answer."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        self.tools = {
            "qemu-system-x86_64", "qemu-img", "qemu-nbd", "mmdebstrap", "mkfs.ext4",
            "e2fsck", "sfdisk", "grub-mkimage", "chroot", "tesseract", "swtpm",
            "mkfs.vfat", "mmd", "mcopy", "dpkg-deb", "qemu-system-aarch64",
            "qemu-system-riscv64",
        }  # fmt: skip
        self.netdevs = "Available netdev backend types:\nsocket\nstream\ndgram\nuser\ntap\n"
        self.accels = "Accelerators supported in QEMU binary:\ntcg\nkvm\n"
        self.choice = AccelChoice("tcg", PVM, warning="KVM not usable")
        self.uid = 0
        self.free = 50 * 2**30
        self.mirror: str | None = "http://mirror.example/debian"
        self.guestfs: tuple[bool, str] | None = (True, "libguestfs 1.48.6 in 15 s")
        self.guestfs_env: dict[str, str] = {}
        self.libvirt = True
        self.missing_modules: set[str] = set()  # Python modules not importable
        self.cache = tmp_path / "cache"
        grub = tmp_path / "grub"
        grub.mkdir()
        (grub / "boot.img").write_bytes(b"\0" * 512)
        # aarch64 and riscv64 guests' firmware (firmware.py)
        firmware_dir = tmp_path / "firmware"
        firmware_dir.mkdir()
        for name in ("AAVMF_CODE.fd", "AAVMF_VARS.fd", "fw_jump.elf", "u-boot.bin"):
            (firmware_dir / name).write_bytes(b"\0")
        monkeypatch.setattr(firmware, "AAVMF_DIR", firmware_dir)
        monkeypatch.setattr(firmware, "OPENSBI", firmware_dir / "fw_jump.elf")
        monkeypatch.setattr(firmware, "UBOOT", firmware_dir / "u-boot.bin")
        monkeypatch.setattr(builder, "GRUB_PLATFORM_DIR", grub)
        monkeypatch.setattr(doctor.shutil, "which", self.which)
        monkeypatch.setattr(doctor, "_run", self.run)
        monkeypatch.setattr(doctor.accel, "choose", lambda requested: self.choice)
        monkeypatch.setattr(doctor.os, "geteuid", lambda: self.uid)
        monkeypatch.setattr(
            doctor.shutil,
            "disk_usage",
            lambda path: SimpleNamespace(free=self.free, total=0, used=0),
        )
        monkeypatch.setattr(mirror, "debian_mirror", self.debian_mirror)
        monkeypatch.setattr(doctor, "_launch_guestfs", self.launch_guestfs)
        monkeypatch.setattr(doctor, "_libvirt_check", self.libvirt_check)
        monkeypatch.setattr(
            doctor, "_importable", lambda module: module not in self.missing_modules
        )
        self.guestfs_importable(True, monkeypatch)

    def which(self, tool: str, mode: int = os.F_OK | os.X_OK, path: str | None = None) -> str:
        return f"/usr/bin/{tool}" if tool in self.tools else None  # type: ignore[return-value]

    def run(self, argv: list[str], timeout: float = 30.0, env: Any = None) -> Any:
        if argv[0].endswith("qemu-system-x86_64") and argv[1:] == ["--version"]:
            return SimpleNamespace(returncode=0, stdout="QEMU emulator version 7.2.22\n")
        if argv[0].endswith("qemu-img"):
            return SimpleNamespace(returncode=0, stdout="qemu-img version 7.2.22\n")
        if argv[1:] == ["-netdev", "help"]:
            return SimpleNamespace(returncode=0, stdout=self.netdevs)
        if argv[1:] == ["-accel", "help"]:
            return SimpleNamespace(returncode=0, stdout=self.accels)
        raise AssertionError(f"unexpected probe {argv}")

    def debian_mirror(self) -> str:
        if self.mirror is None:
            raise KvmConfigError("no Debian mirror found in /etc/apt/sources.list")
        return self.mirror

    def launch_guestfs(self, env: dict[str, str]) -> tuple[bool, str]:
        self.guestfs_env = env
        assert self.guestfs is not None
        return self.guestfs

    def libvirt_check(self) -> doctor.Check:
        what = "libvirt (optional: --kvm-backend libvirt)"
        if self.libvirt:
            return doctor.Check(what, True, "qemu:///system answers", False, optional=True)
        hint = "apt-get install libvirt-daemon-system; systemctl start libvirtd"
        return doctor.Check(what, False, "cannot connect", False, hint, optional=True)

    @staticmethod
    def guestfs_importable(yes: bool, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setitem(sys.modules, "guestfs", SimpleNamespace() if yes else None)

    def build(self) -> None:
        path = catalog_path(doctor.DOCTOR_IMAGE, self.cache)
        path.parent.mkdir(parents=True)
        path.write_bytes(b"")

    def doctor(self, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
        code = cli.main(["--cache", str(self.cache), "doctor", *extra])
        return code, capsys.readouterr().out


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Machine:
    return Machine(monkeypatch, tmp_path)


def lines_about(out: str, what: str) -> list[str]:
    """The line for ``what`` and its indented hint lines."""
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if line[4:].startswith(f" {what}"):
            found = [line]
            found += [rest for rest in lines[i + 1 :] if rest.startswith("     ")][:2]
            return found
    raise AssertionError(f"no line about {what!r} in:\n{out}")


def test_everything_present_exits_zero(machine: Machine, capsys):
    code, out = machine.doctor(capsys)
    assert code == 0, out
    assert "[!!]" not in out and "[--]" not in out
    assert lines_about(out, "qemu-system-x86_64")[0].startswith("[ok]")
    assert "the default mode works here: pytest --kvm-image debian-12" in out
    assert out.index("default mode") < out.index("optional (not needed by the default mode)")


def test_the_accelerator_line_says_why_kvm_is_not_used(machine: Machine, capsys):
    _, out = machine.doctor(capsys)
    line, note = lines_about(out, "accelerator")
    assert line.startswith("[ok] accelerator: tcg")
    assert f"KVM not usable: {PVM}" in line
    assert "nothing to install" in note


@pytest.mark.parametrize(
    ("reason", "advice"),
    [
        ("/dev/kvm does not exist (no KVM module loaded)", "modprobe kvm_intel"),
        ("/dev/kvm is not readable and writable by this user", "group 'kvm'"),
    ],
)
def test_fixable_kvm_problems_say_what_to_do(machine: Machine, capsys, reason, advice):
    machine.choice = AccelChoice("tcg", reason)
    code, out = machine.doctor(capsys)
    assert code == 0  # TCG still runs guests
    line, note = lines_about(out, "accelerator")
    assert reason in line and advice in note


def test_working_kvm_is_reported(machine: Machine, capsys):
    machine.choice = AccelChoice("kvm", "KVM probe passed")
    code, out = machine.doctor(capsys)
    assert code == 0
    assert "[ok] accelerator: kvm (KVM probe passed)" in out
    # libguestfs is then left to use KVM.
    assert "LIBGUESTFS_BACKEND_SETTINGS" not in machine.guestfs_env


@pytest.mark.parametrize(
    ("tool", "what", "package"),
    [
        ("qemu-system-x86_64", "qemu-system-x86_64", "apt-get install qemu-system-x86"),
        ("qemu-img", "qemu-img", "apt-get install qemu-utils"),
    ],
)
def test_missing_qemu_fails_with_the_package(machine: Machine, capsys, tool, what, package):
    machine.tools.discard(tool)
    code, out = machine.doctor(capsys)
    assert code == 1
    line, hint = lines_about(out, what)[:2]
    assert line.startswith(f"[!!] {what}: not found")
    assert hint == f"     install: {package}"
    assert f"missing: {what}" in out.splitlines()[-1]


def test_no_qemu_means_no_accelerator_and_no_user_networking(machine: Machine, capsys):
    machine.tools.discard("qemu-system-x86_64")
    code, out = machine.doctor(capsys)
    assert code == 1
    assert lines_about(out, "user networking")[0].startswith("[!!]")
    assert lines_about(out, "accelerator")[0].startswith("[!!] accelerator: none")


def test_qemu_without_user_networking_fails(machine: Machine, capsys):
    machine.netdevs = "Available netdev backend types:\nsocket\ntap\n"
    code, out = machine.doctor(capsys)
    assert code == 1
    assert "[!!] user networking: " in out and "libslirp" in out


def test_qemu_without_tcg_where_kvm_does_not_work_fails(machine: Machine, capsys):
    machine.accels = "Accelerators supported in QEMU binary:\nkvm\n"
    code, out = machine.doctor(capsys)
    assert code == 1
    assert lines_about(out, "accelerator")[0].startswith("[!!] accelerator: none")


@pytest.mark.parametrize(
    ("tool", "package"),
    [
        ("mmdebstrap", "mmdebstrap"),
        ("mkfs.ext4", "e2fsprogs"),
        ("sfdisk", "fdisk"),
        ("grub-mkimage", "grub-common"),
    ],
)
def test_missing_builder_tool_fails_until_the_image_is_built(
    machine: Machine, capsys, tool, package
):
    machine.tools.discard(tool)
    code, out = machine.doctor(capsys)
    assert code == 1
    line, hint = lines_about(out, tool)[:2]
    assert line.startswith(f"[!!] {tool} (builds debian-12): not found")
    assert hint == f"     install: apt-get install {package}"
    assert "image debian-12: not built yet" in out
    # Once the image is in the cache, the builder is needed only to rebuild it.
    machine.build()
    code, out = machine.doctor(capsys)
    assert code == 0, out
    assert lines_about(out, tool)[0].startswith(f"[--] {tool} (only to rebuild it): not found")
    assert "[ok] image debian-12: built: " in out


def test_missing_grub_boot_image_names_its_package(machine: Machine, capsys, tmp_path):
    (builder.GRUB_PLATFORM_DIR / "boot.img").unlink()
    code, out = machine.doctor(capsys)
    assert code == 1
    assert lines_about(out, "GRUB i386-pc")[1] == "     install: apt-get install grub-pc-bin"


def test_building_needs_root_and_a_mirror(machine: Machine, capsys):
    machine.uid = 1000
    machine.mirror = None
    code, out = machine.doctor(capsys)
    assert code == 1
    root = lines_about(out, "root")
    assert root[0].startswith("[!!] root (builds debian-12): not root")
    assert "sudo pytest-kvm image build debian-12" in root[1]
    mirror_line = lines_about(out, "Debian mirror")
    assert mirror_line[0].startswith("[!!]") and "no Debian mirror found" in mirror_line[0]
    assert "PYTEST_KVM_MIRROR" in mirror_line[1]


def test_little_free_cache_disk_fails(machine: Machine, capsys):
    machine.free = 2 * 2**30
    code, out = machine.doctor(capsys)
    assert code == 1
    line, hint = lines_about(out, "cache disk")[:2]
    assert line.startswith(f"[!!] cache disk: {machine.cache}: 2.0 GiB free (needs 5 GiB)")
    assert "--kvm-cache" in hint


def test_missing_libguestfs_is_optional(machine: Machine, capsys, monkeypatch):
    Machine.guestfs_importable(False, monkeypatch)
    code, out = machine.doctor(capsys)
    assert code == 0, out
    line, hint = lines_about(out, "libguestfs")[:2]
    assert line.startswith("[--] libguestfs (optional")
    assert hint == (
        "     install: apt-get install python3-guestfs (Debian's binding; "
        "a virtualenv needs --system-site-packages to see it)"
    )
    assert out.index("optional (not needed") < out.index("libguestfs (optional")


def test_libguestfs_is_launched_as_pytest_kvm_runs_it(machine: Machine, capsys):
    code, out = machine.doctor(capsys)
    assert code == 0
    assert machine.guestfs_env["LIBGUESTFS_BACKEND_SETTINGS"] == "force_tcg"
    assert machine.guestfs_env["LIBGUESTFS_BACKEND"] == "direct"
    line = lines_about(out, "libguestfs")[0]
    assert line.startswith("[ok] libguestfs") and "appliance launched" in line
    assert "LIBGUESTFS_BACKEND_SETTINGS=force_tcg" in line


def test_a_libguestfs_that_does_not_launch_is_reported_not_fatal(machine: Machine, capsys):
    machine.guestfs = (False, "no appliance after 240 s")
    code, out = machine.doctor(capsys)
    assert code == 0
    line, hint = lines_about(out, "libguestfs")[:2]
    assert line.startswith("[--] libguestfs") and "no appliance after 240 s" in line
    assert "LIBGUESTFS_BACKEND_SETTINGS=force_tcg libguestfs-test-tool" in hint


def test_quick_does_not_launch_libguestfs(machine: Machine, capsys):
    machine.guestfs = None  # launching would fail the fake
    code, out = machine.doctor(capsys, "--quick")
    assert code == 0
    assert "appliance not launched (--quick)" in out


def test_libvirt_is_optional(machine: Machine, capsys):
    machine.libvirt = False
    code, out = machine.doctor(capsys)
    assert code == 0
    line, hint = lines_about(out, "libvirt")[:2]
    assert line.startswith("[--] libvirt (optional: --kvm-backend libvirt)")
    assert "libvirt-daemon-system" in hint


@pytest.mark.parametrize(
    ("module", "what", "extra"),
    [
        ("xdist", "pytest-xdist (optional: -n N, --kvm-dist-by-image)", "xdist"),
        ("testinfra", "pytest-testinfra (optional: guest.host)", "testinfra"),
        ("pytest_html", "pytest-html (optional: failed guests' artifacts", "html"),
    ],
)
def test_a_missing_optional_part_names_its_extra(machine: Machine, capsys, module, what, extra):
    machine.missing_modules.add(module)
    code, out = machine.doctor(capsys)
    assert code == 0, out  # the default mode does not need it
    line, hint = lines_about(out, what)[:2]
    assert line.startswith(f"[--] {what}") and line.endswith(": not installed")
    assert hint == f"     install: pip install 'pytest-kvm[{extra}]'"
    assert out.index("optional (not needed") < out.index(what)


def test_installed_optional_parts_show_their_versions(machine: Machine, capsys):
    _, out = machine.doctor(capsys)
    for dist in ("pytest-xdist", "pytest-testinfra", "pytest-html"):
        line = lines_about(out, dist)[0]
        assert line.startswith(f"[ok] {dist} (optional: ")
        assert line.split(": ")[-1].startswith(f"{dist} ")  # installed here: the dev extra


def test_missing_libvirt_python_names_the_extra_and_its_build_packages(monkeypatch):
    from pytest_kvm.backends import libvirt
    from pytest_kvm.errors import KvmUnavailable

    def missing() -> object:
        raise KvmUnavailable("the libvirt backend needs libvirt-python")

    monkeypatch.setattr(libvirt, "load_libvirt", missing)
    check = doctor._libvirt_check()
    assert not check.ok and not check.required and check.optional
    assert check.hint == (
        "pip install 'pytest-kvm[libvirt]'; building libvirt-python needs "
        "apt-get install libvirt-dev pkg-config gcc python3-dev"
    )


def test_the_real_libvirt_check_names_the_uri_when_the_daemon_is_down(monkeypatch):
    from pytest_kvm.backends import libvirt

    def refuse(uri: str) -> object:
        raise KvmConfigError(f"--kvm-uri {uri}: cannot connect (no socket)")

    monkeypatch.setattr(libvirt, "connect", refuse)
    check = doctor._libvirt_check()
    assert not check.ok and not check.required and check.optional
    assert "cannot connect" in check.detail and "systemctl start libvirtd" in check.hint


def test_a_hung_libguestfs_probe_is_ended(monkeypatch):
    monkeypatch.setattr(doctor, "GUESTFS_PROBE_TIMEOUT", 1.0)
    monkeypatch.setattr(doctor, "_GUESTFS_PROBE", "import time\ntime.sleep(60)\n")
    ok, why = doctor._launch_guestfs(dict(os.environ))
    assert not ok and why == "no appliance after 1 s"


def _run_real(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("pytest-kvm")
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "pytest_kvm.cli"]
    return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_real_doctor_on_this_machine():
    """The real command, with its libguestfs appliance launch (~15 s under TCG)."""
    proc = _run_real("doctor")
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "Traceback" not in out + proc.stderr
    expected: list[Callable[[str], bool]] = [
        lambda o: "[ok] qemu-system-x86_64: QEMU emulator version" in o,
        lambda o: "[ok] user networking: -netdev user" in o,
        lambda o: "[ok] qemu-img: qemu-img version" in o,
        lambda o: "[ok] cache disk: " in o,
        lambda o: "[ok] libguestfs (optional" in o and "an appliance launched" in o,
        lambda o: "libvirt (optional: --kvm-backend libvirt)" in o,
        lambda o: "the default mode works here: pytest --kvm-image debian-12" in o,
    ]
    for check in expected:
        assert check(out), out
    accel_line = next(line for line in out.splitlines() if "] accelerator: " in line)
    if os.path.exists("/sys/module/kvm_pvm"):  # this machine: KVM is PVM, guests use TCG
        assert accel_line.startswith("[ok] accelerator: tcg"), accel_line
        assert "kvm_pvm" in accel_line
        assert "LIBGUESTFS_BACKEND_SETTINGS=force_tcg" in out


def test_a_missing_tesseract_names_its_debian_package(machine: Machine, capsys):
    machine.tools.discard("tesseract")
    code, out = machine.doctor(capsys)
    assert code == 0, out  # only screen text of a graphical screen needs it
    what = "tesseract (optional: screen_text/wait_for_text on a graphical screen, by OCR)"
    line, hint = lines_about(out, what)[:2]
    assert line == f"[--] {what}: not found"
    assert hint == "     install: apt-get install tesseract-ocr"


def test_a_missing_swtpm_names_its_debian_package(machine: Machine, capsys):
    machine.tools.discard("swtpm")
    code, out = machine.doctor(capsys)
    assert code == 0, out  # only tpm=True needs it
    what = "swtpm (optional: tpm=True, an emulated TPM 2.0 per guest)"
    line, hint = lines_about(out, what)[:2]
    assert line == f"[--] {what}: not found"
    assert hint == "     install: apt-get install swtpm"


def test_foreign_architectures_name_what_is_missing(machine: Machine, capsys):
    machine.tools.discard("qemu-system-aarch64")
    (firmware.UBOOT).unlink()
    code, out = machine.doctor(capsys)
    assert code == 0, out  # optional: the default mode still works
    arm = lines_about(out, "aarch64 guests")
    assert arm[0].startswith("[--]") and "missing: qemu-system-aarch64" in arm[0]
    assert arm[1].strip() == "install: apt-get install qemu-system-arm"
    riscv = lines_about(out, "riscv64 guests")
    assert riscv[0].startswith("[--]") and f"missing: {firmware.UBOOT}" in riscv[0]
    assert riscv[1].strip() == "install: apt-get install u-boot-qemu"
