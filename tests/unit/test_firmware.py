"""--kvm-firmware: values, OVMF's files, QEMU's options, the hybrid layout's pieces
and the check for a signed boot path (uefi-secure), without booting anything."""

from __future__ import annotations

import struct
import subprocess
import uuid
from pathlib import Path

import pytest

from pytest_kvm import firmware
from pytest_kvm.backends.libvirt.domain import domain_xml
from pytest_kvm.backends.qemu import build_argv
from pytest_kvm.config import Settings, resolve
from pytest_kvm.errors import KvmConfigError
from pytest_kvm.firmware import Ovmf, parse_firmware
from pytest_kvm.images import Image, efi, hybrid
from pytest_kvm.request import GuestRequest, guest_firmware
from pytest_kvm.template import Shape
from tests.support.specs import opt, spec


def fake_ovmf(directory: Path) -> Path:
    for name in ("OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd", "OVMF_CODE_4M.secboot.fd"):
        (directory / name).write_bytes(b"\0" * 1024)
    (directory / "OVMF_VARS_4M.ms.fd").write_bytes(b"keys" * 256)
    return directory


def test_values_and_their_sources():
    assert resolve({}, {}, lambda key: None).firmware == "auto"
    assert resolve({"firmware": "UEFI"}, {}, lambda key: None).firmware == "uefi"
    env = {"PYTEST_KVM_FIRMWARE": "uefi-secure"}
    assert resolve({}, env, lambda key: None).firmware == "uefi-secure"
    with pytest.raises(KvmConfigError, match=r"^ini kvm_firmware: 'efi' is not one of auto"):
        resolve({}, {}, lambda key: "efi" if key == "kvm_firmware" else None)
    marked = Settings().with_marker({"firmware": "bios"}, "t")
    assert marked.firmware == "bios"
    assert firmware.resolve("auto") == "bios" and parse_firmware(" bios ", "x") == "bios"


def test_missing_ovmf_names_the_debian_package(tmp_path: Path):
    with pytest.raises(KvmConfigError) as info:
        Ovmf.find("uefi-secure", tmp_path)
    message = str(info.value)
    assert "\n" not in message and "OVMF_CODE_4M.secboot.fd" in message
    assert message.endswith("(Debian package ovmf: apt-get install ovmf)")


def test_each_guest_copies_the_variables_and_the_shared_file_is_read_only(tmp_path: Path):
    ovmf = Ovmf.find("uefi-secure", fake_ovmf(tmp_path))
    own = ovmf.copy_vars(tmp_path / "efivars.fd")
    assert own.read_bytes() == ovmf.vars.read_bytes() and own.stat().st_mode & 0o777 == 0o600
    argv = build_argv(spec(tmp_path, firmware=ovmf, efivars=own))
    assert "smm=on" in opt(argv, "-machine")
    assert "driver=cfi.pflash01,property=secure,value=on" in opt(argv, "-global")
    pflash = [d for d in opt(argv, "-drive") if d.startswith("if=pflash")]
    assert pflash == [
        f"if=pflash,format=raw,unit=0,readonly=on,file={ovmf.code}",
        f"if=pflash,format=raw,unit=1,file={own}",
    ]
    plain = Ovmf.find("uefi", tmp_path)
    argv = build_argv(spec(tmp_path, firmware=plain, efivars=own))
    assert "smm=on" not in opt(argv, "-machine") and not opt(argv, "-global")
    bios = build_argv(spec(tmp_path))
    assert not any("pflash" in d for d in opt(bios, "-drive"))


def test_libvirt_uses_firmware_autoselection(tmp_path: Path):
    ovmf = Ovmf.find("uefi-secure", fake_ovmf(tmp_path))
    xml = domain_xml(spec(tmp_path, firmware=ovmf, efivars=tmp_path / "v"), "d", "qemu", [])
    assert '<os firmware="efi">' in xml and '<loader secure="yes" />' in xml
    assert '<feature enabled="yes" name="secure-boot" />' in xml and '<smm state="on" />' in xml
    plain = domain_xml(spec(tmp_path, firmware=Ovmf.find("uefi", tmp_path)), "d", "qemu", [])
    assert '<feature enabled="no" name="secure-boot" />' in plain and "loader" not in plain
    assert "firmware" not in domain_xml(spec(tmp_path), "d", "qemu", [])


def test_template_keys_stay_for_bios_and_differ_for_uefi():
    bios = Shape(memory=1024, cpus=2)
    assert "firmware" not in bios.key_fields() and bios.label() == "1024M-2cpu-user"
    secure = Shape(memory=1024, cpus=2, firmware="uefi-secure")
    assert secure.key_fields()["firmware"] == "uefi-secure"
    assert secure.label() == "1024M-2cpu-user-uefi-secure"


def test_hybrid_layout_keeps_root_as_partition_1(tmp_path: Path):
    disk = tmp_path / "disk.raw"
    size = 64 << 20
    with open(disk, "wb") as f:
        f.truncate(size)
    script = hybrid.sfdisk_script(size, str(uuid.uuid4()), str(uuid.uuid4()))
    subprocess.run(["sfdisk", "--no-reread", "--no-tell-kernel", "--quiet", str(disk)],
                   input=script.encode(), check=True)  # fmt: skip
    dump = subprocess.run(["sfdisk", "--dump", str(disk)], capture_output=True, text=True,
                          check=True).stdout  # fmt: skip
    assert f"disk.raw1 : start=       {hybrid.ROOT_START // 512}" in dump
    assert hybrid.BIOS_BOOT_TYPE in dump.split("disk.raw14 :")[1].splitlines()[0]
    assert efi.find_esp(disk.read_bytes()[: 34 * 512]) == (
        hybrid.ESP_START // 512,
        hybrid.ROOT_START // 512 - 1,
    )
    assert hybrid.root_size(size) == size - (33 << 20)


def _pe(signed: bool) -> bytes:
    data = bytearray(1024)
    data[:2] = b"MZ"
    struct.pack_into("<I", data, 0x3C, 0x80)
    data[0x80:0x84] = b"PE\0\0"
    struct.pack_into("<H", data, 0x80 + 24, 0x20B)
    if signed:
        struct.pack_into("<II", data, 0x80 + 24 + 112 + 32, 512, 256)
    return bytes(data)


def test_signed_pe():
    assert efi.is_signed_pe(_pe(True)) and not efi.is_signed_pe(_pe(False))
    assert not efi.is_signed_pe(b"not a PE file")


def test_uefi_secure_refuses_an_image_without_a_signed_boot_path(tmp_path, monkeypatch):
    monkeypatch.setattr(firmware, "OVMF_DIR", fake_ovmf(tmp_path))
    raw = tmp_path / "mbr.raw"
    raw.write_bytes(b"\0" * (1 << 20))
    image = Image("mbr", raw, "raw", str(raw), 1 << 20)
    settings = Settings(firmware="uefi-secure", firmware_source="command line --kvm-firmware")
    with pytest.raises(KvmConfigError) as info:
        guest_firmware(settings, image)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(
        "command line --kvm-firmware: firmware 'uefi-secure' needs a signed boot path, "
        "and image 'mbr' has none (no GPT"
    )
    assert guest_firmware(Settings(firmware="uefi"), image) == "uefi"
    assert guest_firmware(Settings(), image) == "bios"


def test_uefi_secure_refusal_names_where_uefi_secure_came_from(tmp_path, monkeypatch):
    """Like every bad input, the refusal names the value's source: the option, the
    environment, the ini file, the marker or the factory's argument."""
    monkeypatch.setattr(firmware, "OVMF_DIR", fake_ovmf(tmp_path))
    raw = tmp_path / "mbr.raw"
    raw.write_bytes(b"\0" * (1 << 20))
    image = Image("mbr", raw, "raw", str(raw), 1 << 20)
    secure = "uefi-secure"
    marked = Settings().with_marker({"firmware": "uefi"}, "t.py::t")
    factory = GuestRequest.build("t.py::t: kvm_guest_factory", firmware=secure)
    cases = {
        "command line --kvm-firmware": resolve({"firmware": secure}, {}, lambda key: None),
        "environment PYTEST_KVM_FIRMWARE": resolve(
            {}, {"PYTEST_KVM_FIRMWARE": secure}, lambda key: None
        ),
        "ini kvm_firmware": resolve({}, {}, {"kvm_firmware": secure}.get),
        "t.py::t (@pytest.mark.kvm firmware=)": Settings().with_marker(
            {"firmware": secure}, "t.py::t"
        ),
        "t.py::t: kvm_guest_factory firmware=": factory.shaped(marked),
    }
    for source, settings in cases.items():
        assert settings.firmware_source == source
        with pytest.raises(KvmConfigError) as info:
            guest_firmware(settings, image)
        assert str(info.value).startswith(f"{source}: firmware 'uefi-secure' needs a signed")
