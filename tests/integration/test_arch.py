"""Guest architectures, on real guests of whatever --kvm-image is given: run it with
``--kvm-image debian-12-arm64`` (and ``debian-13-riscv64``) for guests of another
architecture than the host's (scripts/test.sh does). What a user checks: ``uname -m``
is ``guest.arch``, SSH and the console work, clones are restored from a template and
from a prepared snapshot, libguestfs customises the disk, the artifacts of a failed
test are there, and a mismatched ``--kvm-arch`` is one line."""

from __future__ import annotations

import re
import secrets
import shlex
import subprocess

import pytest

from pytest_kvm import arch as arches
from pytest_kvm.images.store import image_name

pytestmark = pytest.mark.integration

# What an image's name says it is: debian-12-arm64, or a path to one built as
# debian-12-arm64-<digest>.qcow2; any other name: the host's architecture.
NAMED = {"arm64": "aarch64", "riscv64": "riscv64"}


def _named_arch(image: str) -> str:
    for word, arch in NAMED.items():
        if re.search(rf"(^|-){word}(-|$)", image_name(image)):
            return arch
    return arches.host_arch()


def test_uname_is_the_guests_arch_and_ssh_works(kvm_guest, kvm_image):
    arch = kvm_guest.succeed("uname -m").strip()
    assert arch == kvm_guest.arch
    assert arch == _named_arch(kvm_image.source)
    # what `guest.ssh_command` prints works from a shell, as a person would paste it
    out = subprocess.run(
        [*shlex.split(kvm_guest.ssh_command), "uname", "-m"],
        capture_output=True, text=True, timeout=120 * kvm_guest.timeout_scale, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == arch


def test_firmware_is_the_architectures(kvm_guest):
    expected = {"x86_64": "bios", "aarch64": "uefi", "riscv64": "u-boot"}[kvm_guest.arch]
    assert kvm_guest.firmware == expected
    if expected == "uefi":  # AAVMF booted it: the kernel has EFI runtime services
        kvm_guest.succeed("test -d /sys/firmware/efi")


def test_console_is_the_architectures_serial_port(kvm_guest):
    console = arches.get(kvm_guest.arch).console
    assert f"console={console}" in kvm_guest.succeed("cat /proc/cmdline")
    token = secrets.token_hex(6)
    kvm_guest.succeed(f"echo 'arch console {token}' > /dev/{console}")
    kvm_guest.wait_for_console(f"arch console {token}", timeout=30)
    # and what is typed on it reaches the guest: a login prompt answers
    kvm_guest.console.send("\n")
    kvm_guest.console.expect(re.compile(r"login:"), timeout=60 * kvm_guest.timeout_scale)


def test_clones_are_restored_from_a_template_and_are_distinct(kvm_guest_factory):
    a = kvm_guest_factory()
    b = kvm_guest_factory()
    for guest in (a, b):
        assert "restore" in guest.boot_timings, guest.boot_timings  # not a real boot
        assert guest.succeed("uname -m").strip() == guest.arch
    assert a.succeed("cat /etc/machine-id") != b.succeed("cat /etc/machine-id")
    assert a.mac != b.mac
    # the template's name says its architecture (a template per architecture)
    assert a.template is not None
    if a.arch != "x86_64":
        assert f"-{a.arch}-" in a.template.name


def _prepare(guest):
    guest.succeed("echo prepared > /etc/pytest-kvm-prepared")


def test_a_prepared_snapshot_is_cloned_on_the_guests_arch(kvm_guest_factory, kvm_snapshot):
    snap = kvm_snapshot("arch-prepared", _prepare)
    a = kvm_guest_factory(image=snap)
    b = kvm_guest_factory(image=snap)
    for guest in (a, b):
        assert "restore" in guest.boot_timings, guest.boot_timings
        assert guest.succeed("cat /etc/pytest-kvm-prepared") == "prepared\n"
        assert guest.succeed("uname -m").strip() == guest.arch
    a.succeed("rm /etc/pytest-kvm-prepared")  # each clone's disk is its own
    assert b.succeed("cat /etc/pytest-kvm-prepared") == "prepared\n"


def test_libguestfs_customises_a_disk_of_any_arch(kvm_guest_factory, kvm_image):
    if _named_arch(kvm_image.source) == arches.host_arch():
        pytest.skip("the host's architecture: tests/integration/test_customize.py covers it")
    # fixed contents: the customised image (and its template) is cached across runs
    guest = kvm_guest_factory(
        customize={"files": {"/etc/pytest-kvm-customised": "by libguestfs\n"}}
    )
    assert guest.succeed("cat /etc/pytest-kvm-customised") == "by libguestfs\n"
    assert guest.succeed("uname -m").strip() == guest.arch


def test_failed_test_artifacts(pytester, image_arg, cache_arg, inner_env):
    token = secrets.token_hex(6)
    pytester.makepyfile(
        f"""
        from pytest_kvm import arch

        def test_fails(kvm_guest):
            console = arch.get(kvm_guest.arch).console
            kvm_guest.succeed(f"echo 'console {token}' > /dev/{{console}}")
            assert False
        """
    )
    arts = pytester.path / "arts"
    result = pytester.runpytest_subprocess(
        f"--kvm-image={image_arg}", cache_arg, f"--kvm-artifacts={arts}", "-p", "no:cacheprovider",
    )  # fmt: skip
    result.assert_outcomes(failed=1)
    [folder] = [p for p in arts.glob("*/*") if p.is_dir()]
    files = {p.name for p in folder.iterdir()}
    assert {"serial.log", "qemu-argv.txt", "journal.txt", "screen.png"} <= files, files
    assert f"console {token}" in (folder / "serial.log").read_text(errors="replace")
    argv = (folder / "qemu-argv.txt").read_text().splitlines()
    assert argv[0] == arches.get(_named_arch(image_arg)).qemu


def test_an_image_of_another_arch_than_asked_is_a_one_line_error(
    pytester, image_arg, cache_arg, inner_env
):
    other = "riscv64" if _named_arch(image_arg) != "riscv64" else "aarch64"
    pytester.makepyfile("def test_guest(kvm_guest):\n    pass\n")
    result = pytester.runpytest_subprocess(
        f"--kvm-image={image_arg}", cache_arg, f"--kvm-arch={other}", "-p", "no:cacheprovider",
    )  # fmt: skip
    out = result.stdout.str() + result.stderr.str()
    expected = f"command line --kvm-arch: architecture '{other}', but image "
    lines = [line for line in out.splitlines() if expected in line]
    assert lines, out
    assert lines[0].rstrip().endswith(")")  # "... is aarch64 (how it was found)", one line
