"""Guest architectures: --kvm-arch's values and sources, the image's architecture read
from its ESP (no boot), the mismatch and missing-package errors, the per-architecture
firmware, QEMU command lines and template keys; nothing is booted here."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest

from pytest_kvm import arch as arches
from pytest_kvm import firmware, imagearch
from pytest_kvm.accel import AccelChoice
from pytest_kvm.backends.base import Drive
from pytest_kvm.backends.libvirt.domain import domain_xml
from pytest_kvm.backends.qemu import build_argv
from pytest_kvm.config import Settings, resolve
from pytest_kvm.errors import GuestLaunchError, KvmConfigError, KvmUnavailable
from pytest_kvm.firmware import Ovmf, UBoot
from pytest_kvm.guest.guest import timeout_scale
from pytest_kvm.images import Image
from pytest_kvm.request import GuestRequest, guest_arch, guest_firmware
from pytest_kvm.template import Shape, template_key
from tests.support.specs import LIBVIRT_DISKS, libvirt_spec, opt, spec


def fake_aavmf(directory: Path) -> Ovmf:
    (directory / "AAVMF_CODE.fd").write_bytes(b"\0" * 1024)
    (directory / "AAVMF_VARS.fd").write_bytes(b"\0" * 1024)
    return Ovmf.find("uefi", directory, arch="aarch64")


def fake_uboot(directory: Path) -> UBoot:
    (directory / "fw_jump.elf").write_bytes(b"\x7fELF")
    (directory / "u-boot.bin").write_bytes(b"\0" * 64)
    return UBoot.find(directory / "fw_jump.elf", directory / "u-boot.bin")


# -- --kvm-arch --------------------------------------------------------------------


def test_arch_values_aliases_and_sources():
    assert resolve({}, {}, lambda key: None).arch == "auto"
    assert resolve({"arch": "arm64"}, {}, lambda key: None).arch == "aarch64"
    env = resolve({}, {"PYTEST_KVM_ARCH": "riscv64"}, lambda key: None)
    assert env.arch == "riscv64" and env.arch_source == "environment PYTEST_KVM_ARCH"
    assert resolve({}, {}, {"kvm_arch": "AMD64"}.get).arch == "x86_64"
    marked = Settings().with_marker({"arch": "aarch64"}, "t.py::t")
    assert marked.arch_source == "t.py::t (@pytest.mark.kvm arch=)"
    shaped = GuestRequest.build("t.py::t: kvm_guest_factory", arch="arm64").shaped(Settings())
    assert shaped.arch == "aarch64" and shaped.arch_source == "t.py::t: kvm_guest_factory arch="


def test_a_bad_arch_is_one_line_naming_value_and_source():
    with pytest.raises(KvmConfigError) as info:
        resolve({"arch": "sparc64"}, {}, lambda key: None)
    assert str(info.value) == (
        "command line --kvm-arch: architecture 'sparc64' is not one of "
        "auto, x86_64, aarch64, riscv64"
    )


# -- the image's architecture ------------------------------------------------------


def _pe(machine: int) -> bytes:
    data = bytearray(1024)
    data[:2] = b"MZ"
    struct.pack_into("<I", data, 0x3C, 0x80)
    data[0x80:0x84] = b"PE\0\0"
    struct.pack_into("<H", data, 0x84, machine)
    return bytes(data)


def _disk_with_esp(tmp_path: Path, boot_files: dict[str, bytes]) -> Path:
    """A raw GPT disk whose ESP (FAT) holds ``\\EFI\\BOOT\\<name>`` for each entry."""
    esp = tmp_path / "esp.img"
    with open(esp, "wb") as f:
        f.truncate(8 << 20)
    subprocess.run(["mkfs.vfat", str(esp)], check=True, capture_output=True)
    env = {"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"}
    subprocess.run(["mmd", "-i", str(esp), "::/EFI", "::/EFI/BOOT"], check=True, env=env)
    for name, data in boot_files.items():
        (tmp_path / name).write_bytes(data)
        subprocess.run(["mcopy", "-i", str(esp), str(tmp_path / name), f"::/EFI/BOOT/{name}"],
                       check=True, env=env)  # fmt: skip
    disk = tmp_path / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(16 << 20)
    script = "label: gpt\nstart=2048, size=16384, type=uefi\n"
    subprocess.run(["sfdisk", "--no-reread", "--no-tell-kernel", "--quiet", str(disk)],
                   input=script.encode(), check=True)  # fmt: skip
    with open(disk, "r+b") as f:
        f.seek(2048 * 512)
        f.write(esp.read_bytes())
    return disk


def test_pe_machine():
    assert imagearch.pe_machine(_pe(0xAA64)) == 0xAA64
    assert imagearch.pe_machine(b"\x7fELF") is None


@pytest.mark.parametrize(
    ("boot", "machine", "expected"),
    [("BOOTAA64.EFI", 0xAA64, "aarch64"), ("BOOTX64.EFI", 0x8664, "x86_64"),
     ("BOOTRISCV64.EFI", 0x5064, "riscv64")],
)  # fmt: skip
def test_the_esp_boot_file_tells_the_architecture_and_is_remembered(
    tmp_path, boot, machine, expected
):
    disk = _disk_with_esp(tmp_path, {boot: _pe(machine)})
    image = Image("mine", disk, "raw", str(disk), 16 << 20)
    cache = tmp_path / "cache"
    assert imagearch.image_arch(image, cache) == (
        expected,
        f"its \\EFI\\BOOT boot file is {expected}",
    )
    records = list((cache / "facts").glob("arch-*.json"))
    assert len(records) == 1 and f'"arch": "{expected}"' in records[0].read_text()


def test_an_image_without_an_esp_is_of_no_known_architecture(tmp_path):
    raw = tmp_path / "mbr.raw"
    raw.write_bytes(b"\0" * (1 << 20))
    image = Image("mbr", raw, "raw", str(raw), 1 << 20)
    assert imagearch.image_arch(image, tmp_path)[0] is None
    # what a guest of it is: x86_64 (what pytest-kvm always ran), or what was asked
    assert guest_arch(Settings(cache=tmp_path), image) == "x86_64"
    asked = Settings(cache=tmp_path, arch="aarch64")
    assert guest_arch(asked, image) == "aarch64"


def test_a_catalog_image_is_its_recipes_architecture(tmp_path):
    image = Image("debian-12", tmp_path / "x.qcow2", "qcow2", "debian-12")
    assert imagearch.image_arch(image) == ("x86_64", "its catalog recipe says x86_64")


def test_an_image_of_another_architecture_than_asked_is_one_line(tmp_path):
    disk = _disk_with_esp(tmp_path, {"BOOTAA64.EFI": _pe(0xAA64)})
    image = Image("mine", disk, "raw", str(disk), 16 << 20)
    settings = Settings(cache=tmp_path, arch="riscv64", arch_source="command line --kvm-arch")
    with pytest.raises(KvmConfigError) as info:
        guest_arch(settings, image)
    assert str(info.value) == (
        "command line --kvm-arch: architecture 'riscv64', but image 'mine' is aarch64 "
        "(its \\EFI\\BOOT boot file is aarch64)"
    )
    assert guest_arch(Settings(cache=tmp_path, arch="aarch64"), image) == "aarch64"


@pytest.mark.parametrize(
    ("arch", "binary", "package"),
    [("aarch64", "qemu-system-aarch64", "qemu-system-arm"),
     ("riscv64", "qemu-system-riscv64", "qemu-system-misc")],
)  # fmt: skip
def test_a_missing_qemu_skips_naming_the_package(tmp_path, monkeypatch, arch, binary, package):
    monkeypatch.setattr(arches.shutil, "which", lambda name: None)
    raw = tmp_path / "mbr.raw"
    raw.write_bytes(b"\0" * (1 << 20))
    image = Image("mbr", raw, "raw", str(raw), 1 << 20)
    with pytest.raises(KvmUnavailable) as info:
        guest_arch(Settings(cache=tmp_path, arch=arch), image)
    assert str(info.value) == (
        f"image 'mbr' is {arch}: {binary} is not installed "
        f"(Debian package {package}: apt-get install {package})"
    )


# -- firmware per architecture -----------------------------------------------------


def test_auto_firmware_per_architecture():
    assert firmware.resolve("auto") == "bios"
    assert firmware.resolve("auto", "aarch64") == "uefi"
    assert firmware.resolve("auto", "riscv64") == "u-boot"


def test_firmware_an_architecture_cannot_boot_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(firmware, "AAVMF_DIR", tmp_path)
    fake_aavmf(tmp_path)
    image = Image("debian-12-arm64", tmp_path / "x", "qcow2", "x")
    for name in ("bios", "uefi-secure", "u-boot"):
        settings = Settings(firmware=name, firmware_source="ini kvm_firmware")
        with pytest.raises(KvmConfigError) as info:
            guest_firmware(settings, image, "aarch64")
        assert str(info.value) == (
            f"ini kvm_firmware: firmware {name!r} for image 'debian-12-arm64': "
            f"aarch64 guests boot with 'uefi', not {name!r}"
        )
    assert guest_firmware(Settings(), image, "aarch64") == "uefi"
    with pytest.raises(KvmConfigError, match="riscv64 guests boot with 'u-boot', not 'uefi'"):
        guest_firmware(Settings(firmware="uefi"), image, "riscv64")
    with pytest.raises(KvmConfigError, match=r"x86_64 guests boot with .*, not 'u-boot'"):
        guest_firmware(Settings(firmware="u-boot"), image, "x86_64")


def test_missing_firmware_names_the_debian_package(tmp_path):
    with pytest.raises(KvmConfigError) as info:
        Ovmf.find("uefi", tmp_path, arch="aarch64")
    message = str(info.value)
    assert "\n" not in message and "AAVMF_CODE.fd" in message
    assert message.endswith("(Debian package qemu-efi-aarch64: apt-get install qemu-efi-aarch64)")
    (tmp_path / "fw_jump.elf").write_bytes(b"x")
    with pytest.raises(KvmConfigError, match=r"u-boot.bin, which is missing \(Debian package "
                       r"u-boot-qemu: apt-get install u-boot-qemu\)$"):  # fmt: skip
        UBoot.find(tmp_path / "fw_jump.elf", tmp_path / "u-boot.bin")
    with pytest.raises(
        KvmConfigError, match=r"\(Debian package opensbi: apt-get install opensbi\)$"
    ):
        UBoot.find(tmp_path / "none.elf", tmp_path / "u-boot.bin")


# -- QEMU's command lines ----------------------------------------------------------


def test_aarch64_argv(tmp_path):
    aavmf = fake_aavmf(tmp_path)
    efivars = tmp_path / "efivars.fd"
    drives = (Drive(tmp_path / "disk.qcow2"), Drive(tmp_path / "seed.iso", "raw", readonly=True),
              Drive(tmp_path / "extra.iso", "raw", media="cdrom"))  # fmt: skip
    argv = build_argv(spec(tmp_path, arch="aarch64", firmware=aavmf, efivars=efivars,
                           drives=drives))  # fmt: skip
    assert argv[0] == "qemu-system-aarch64"
    assert opt(argv, "-machine") == ["virt"]
    assert opt(argv, "-cpu") == ["cortex-a72"] and opt(argv, "-accel") == ["tcg,thread=multi"]
    devices = opt(argv, "-device")
    assert not any(d.startswith(("vmgenid", "ide-cd")) for d in devices)
    assert "virtio-blk-pci,drive=drive0,bootindex=1" in devices
    assert "scsi-cd,drive=drive2,bus=scsi0.0" in devices
    assert any(d.startswith("virtserialport,") for d in devices)  # qemu-ga, as on x86
    assert opt(argv, "-drive")[-2:] == [
        f"if=pflash,format=raw,unit=0,readonly=on,file={tmp_path / 'AAVMF_CODE.fd'}",
        f"if=pflash,format=raw,unit=1,file={efivars}",
    ]


def test_riscv64_argv_boots_u_boot_or_a_given_kernel(tmp_path):
    uboot = fake_uboot(tmp_path)
    argv = build_argv(spec(tmp_path, arch="riscv64", firmware=uboot))
    assert argv[0] == "qemu-system-riscv64" and opt(argv, "-machine") == ["virt"]
    assert opt(argv, "-bios") == [str(tmp_path / "fw_jump.elf")]
    assert opt(argv, "-kernel") == [str(tmp_path / "u-boot.bin")]
    direct = build_argv(spec(tmp_path, arch="riscv64", firmware=uboot,
                             kernel=tmp_path / "vmlinuz", append="console=ttyS0"))  # fmt: skip
    assert opt(direct, "-kernel") == [str(tmp_path / "vmlinuz")]


def test_foreign_guests_refuse_kvm_tpm_and_a_missing_firmware(tmp_path):
    aavmf = fake_aavmf(tmp_path)
    efivars = tmp_path / "efivars.fd"
    with pytest.raises(GuestLaunchError, match="a aarch64 guest cannot run under KVM"):
        build_argv(spec(tmp_path, arch="aarch64", accel="kvm", firmware=aavmf, efivars=efivars))
    with pytest.raises(GuestLaunchError, match="TPM is emulated for x86_64 guests only"):
        build_argv(spec(tmp_path, arch="aarch64", tpm=True, tpm_socket=tmp_path / "t",
                        firmware=aavmf, efivars=efivars))  # fmt: skip
    with pytest.raises(GuestLaunchError, match="needs its firmware"):
        build_argv(spec(tmp_path, arch="aarch64"))


def test_libvirt_refuses_foreign_architectures(tmp_path):
    with pytest.raises(GuestLaunchError, match="libvirt backend runs x86_64 guests only"):
        domain_xml(libvirt_spec(tmp_path, arch="aarch64"), "d", "qemu", LIBVIRT_DISKS)


# -- templates and waits -----------------------------------------------------------


def test_the_architecture_is_in_the_template_key_and_name(tmp_path):
    image = tmp_path / "i.qcow2"
    image.write_bytes(b"x")
    img = Image("i", image, "qcow2", str(image))
    x86, arm = Shape(1024, 2), Shape(1024, 2, firmware="uefi", arch="aarch64")
    assert "arch" not in x86.key_fields()  # x86_64 templates keep their keys
    assert arm.key_fields()["arch"] == "aarch64"
    assert arm.label() == "1024M-2cpu-user-uefi-aarch64"
    uefi = Shape(1024, 2, firmware="uefi")
    assert template_key(img, uefi, "tcg", "q") != template_key(img, arm, "tcg", "q")


def test_foreign_guests_wait_longer_than_host_ones():
    class Run:
        accel = AccelChoice("kvm", "probe passed")

    run = Run()
    assert timeout_scale(run, "x86_64") == 1.0  # type: ignore[arg-type]
    # another architecture is TCG whatever the host's accelerator, and slower than it
    foreign = timeout_scale(run, "aarch64")  # type: ignore[arg-type]
    assert foreign == AccelChoice("tcg", "").timeout_scale * arches.get("aarch64").foreign_slowdown
    assert foreign > AccelChoice("tcg", "").timeout_scale


def test_what_foreign_guests_cannot_have_is_one_line_each(tmp_path):
    from pytest_kvm.customize import Customization
    from pytest_kvm.session import TestGuests

    guests = TestGuests.__new__(TestGuests)
    guests.nodeid = "t.py::t"
    image = Image("debian-12-arm64", tmp_path / "x", "qcow2", "debian-12-arm64")
    none = Customization()
    guests._check_arch("aarch64", image, Settings(), none)  # nothing asked: fine
    guests._check_arch("x86_64", image, Settings(tpm=True, backend="libvirt"), none)
    cases = {
        "the libvirt backend runs x86_64 guests only": (Settings(backend="libvirt"), none),
        "tpm=True: a TPM is emulated for x86_64 guests only": (Settings(tpm=True), none),
        "customize run= runs the image's programs in libguestfs' x86_64 appliance": (
            Settings(), Customization.build(run=["true"], where="t")),
    }  # fmt: skip
    for needle, (settings, custom) in cases.items():
        with pytest.raises(KvmConfigError) as info:
            guests._check_arch("aarch64", image, settings, custom)
        message = str(info.value)
        assert "\n" not in message
        assert message.startswith("t.py::t: image 'debian-12-arm64' is aarch64: " + needle)
