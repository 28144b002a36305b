"""Firmware (--kvm-firmware, marker and factory firmware=): one hybrid catalog image
boots under SeaBIOS, under OVMF and under OVMF with Secure Boot; each UEFI guest's
variables are its own. Restored clones: one template per firmware; the UEFI guests
have a TPM too (tpm=True), so that their template is test_tpm.py's: one boot fewer,
and the TPM changes nothing these tests look at."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from pytest_kvm.firmware import OVMF_DIR, VARS_NAME
from pytest_kvm.snapshot import define

EFI_GLOBAL = "8be4df61-93ca-11d2-aa0d-00e098032b8c"  # EFI_GLOBAL_VARIABLE
SECURE_BOOT = f"/sys/firmware/efi/efivars/SecureBoot-{EFI_GLOBAL}"
# A variable of our own: a GUID nobody else uses.
TEST_GUID = "5c6c1a1e-9b0e-4d5a-8f3e-6b7079746573"
TEST_VAR = f"/sys/firmware/efi/efivars/PytestKvmTest-{TEST_GUID}"


def _secure_boot_byte(guest) -> int:
    # efivarfs: 4 bytes of attributes, then the value (one byte: 1 = on); OVMF
    # without enrolled keys has no SecureBoot variable at all (off)
    # (efivarfs files cannot seek: read through a pipe)
    out = guest.succeed(
        f"if test -e {SECURE_BOOT}; then cat {SECURE_BOOT} | od -An -tu1 -j4 -N1; fi"
    )
    return int(out.strip() or "0")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _template_dir(guest) -> Path:
    info = subprocess.run(
        ["qemu-img", "info", "--output=json", "-U", str(guest.disk_image)],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(json.loads(info.stdout)["full-backing-filename"]).parent


def mark_prepared(guest):
    guest.succeed("echo prepared-under-uefi > /etc/prepared-uefi")


# A prepared snapshot over the uefi template (defined at module level, like a user's).
UEFI_PREPARED = define("it-uefi-prepared", mark_prepared)


def test_bios_guest_has_no_efi(kvm_guest_factory):
    g = kvm_guest_factory(firmware="bios")
    assert g.firmware == "bios"
    g.fail("test -d /sys/firmware/efi")


@pytest.mark.kvm(firmware="uefi", tpm=True)
def test_uefi_guest_boots_with_ovmf_secure_boot_off(kvm_guest):
    assert kvm_guest.firmware == "uefi"
    kvm_guest.succeed("test -d /sys/firmware/efi/efivars")
    assert _secure_boot_byte(kvm_guest) == 0
    # the ESP it booted from is mounted where Debian's grub-install and shim look
    kvm_guest.succeed("test -f /boot/efi/EFI/BOOT/BOOTX64.EFI")


@pytest.mark.kvm(firmware="uefi-secure")
def test_uefi_secure_guest_has_secure_boot_on(kvm_guest):
    assert kvm_guest.firmware == "uefi-secure"
    assert _secure_boot_byte(kvm_guest) == 1
    # the kernel was verified: it says so on its console
    assert "Secure boot enabled" in kvm_guest.succeed("dmesg")


def test_a_prepared_snapshot_over_a_uefi_template_is_built_and_cloned_under_uefi(
    kvm_guest_factory,
):
    """The snapshot's setup ran in a clone of the uefi template, restored under OVMF
    (its saved state is OVMF's), and its clones come back under OVMF too."""
    g = kvm_guest_factory(image=UEFI_PREPARED, firmware="uefi", tpm=True)
    assert g.template is not None and "@it-uefi-prepared-" in g.template.name
    assert g.firmware == "uefi"
    g.succeed("test -d /sys/firmware/efi/efivars")
    assert g.succeed("cat /etc/prepared-uefi").strip() == "prepared-under-uefi"


def test_efi_variables_are_each_guests_own(kvm_guest_factory):
    shared = OVMF_DIR / "OVMF_VARS_4M.fd"
    shared_before = _sha256(shared)
    a = kvm_guest_factory(firmware="uefi", tpm=True)
    template_vars = _template_dir(a) / VARS_NAME
    template_before = _sha256(template_vars)
    # attributes NV|BS|RT (7), then the value
    a.succeed(f"printf '\\007\\000\\000\\000pytest-kvm' > {TEST_VAR}")
    assert a.succeed(f"cat {TEST_VAR} | tail -c +5") == "pytest-kvm"
    # it reached this guest's own flash file (UTF-16 name in OVMF's variable store)
    own = a.disk_image.parent / VARS_NAME
    assert "PytestKvmTest".encode("utf-16-le") in own.read_bytes()
    b = kvm_guest_factory(firmware="uefi", tpm=True)
    b.fail(f"test -e {TEST_VAR}")
    assert _sha256(template_vars) == template_before
    assert _sha256(shared) == shared_before
