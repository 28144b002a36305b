"""An installer's whole loop, with a small install ISO built here (mini_installer.py).

Boot the ISO on a blank disk, answer its questions on the serial console, wait
for it to power off, boot the installed disk, SSH in and check what the answers
changed; and a disk too small for the system gets a clear error and a power-off.

The same ISO boots under UEFI too (El Torito EFI entry: the image's signed shim
and GRUB): installed under OVMF with a TPM, the disk gets an EFI system partition
and boots under UEFI on a machine with fresh variables.

Five guests in all, each a real boot under TCG. Measured on a 2-core TCG host
(shared with other guests, so noisy): building the ISO 133 s once per image (the
cache keeps it; libguestfs' tar_out is 127 s of it), power-on to the first
question 8 to 15 s, the install 55 to 70 s more, the installed disk to SSH 50 to
65 s; the first test 150 to 185 s in all, the small-disk test 10 s. The UEFI test
(one install, one boot of the installed disk, both under OVMF) was measured only on
the same host under load (four runs on its 2 cores): 970 s at load 17 (the copy 215 s,
the installed disk to SSH 440 s), 384 s at load 8 to 11, where the first test took
447 s: it costs about what the first test costs.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from pytest_kvm import accel
from pytest_kvm.guest import Guest
from pytest_kvm.images import Image
from tests.integration.support.mini_installer import (
    BANNER,
    InstallerUnsupported,
    boots_under_uefi,
    build_installer_iso,
)

HOSTNAME = "installed-host"
Factory = Callable[..., Guest]
# Spaces, quotes and a semicolon: the installer must store it as typed.
MOTD = "Installed by pytest-kvm's mini installer; it's 100% tested"


@pytest.fixture
def installer_iso(request: pytest.FixtureRequest, kvm_image: Image) -> Path:
    """The mini installer for the session's image, built once into the cache."""
    from pytest_kvm.plugin import settings_key

    settings = request.config.stash[settings_key]
    force_tcg = accel.choose(settings.accel).name != "kvm"
    try:
        return build_installer_iso(settings.cache, kvm_image, force_tcg=force_tcg)
    except InstallerUnsupported as exc:
        pytest.skip(str(exc))


def test_install_answers_prompts_and_boots_installed_disk(
    kvm_guest_factory: Factory, installer_iso: Path, tmp_path: Path
) -> None:
    inst = kvm_guest_factory(cdrom=installer_iso, boot="cdrom", disk_size="3G", ssh=False)
    inst.console.expect(re.escape(BANNER), timeout=120)
    inst.console.expect(r"installer: \[[\d.]+s\] firmware: bios", timeout=60)
    _answer_and_install(inst, "installing GRUB")

    g = inst.boot_installed()
    # What the installer wrote: systemd read it from /etc/hostname at boot...
    assert f"Hostname set to <{HOSTNAME}>" in g.succeed("journalctl -b -o cat")
    # ...and it is still the name once cloud-init has run with the harness's seed.
    name = g.succeed("hostname").strip()
    assert name == HOSTNAME, (
        f"the installed system was renamed {name!r} after boot: boot_installed()'s "
        "NoCloud seed must keep the installed host name"
    )
    assert g.succeed("cat /etc/motd") == MOTD + "\n"
    # The root the installer made, found through the UUID in grub.cfg and fstab.
    assert g.succeed("findmnt -n -o SOURCE,FSTYPE /").split() == ["/dev/vda1", "ext4"]
    assert g.succeed("cat /sys/block/vda/size").strip() == str(3 * 2**30 // 512)
    # cloud-init ran for this new instance (it gave us the SSH key we are using).
    assert "status: done" in g.succeed("cloud-init status --wait")

    saved = tmp_path / "installed.qcow2"
    inst.save_image(saved)
    argv = ["qemu-img", "info", "--output=json", str(saved)]
    info = json.loads(subprocess.run(argv, capture_output=True, check=True, timeout=60).stdout)
    assert info["format"] == "qcow2"
    assert "backing-filename" not in info  # flattened: usable without the test's overlay
    assert info["virtual-size"] == 3 * 2**30


def test_installer_refuses_a_disk_too_small(
    kvm_guest_factory: Factory, installer_iso: Path
) -> None:
    inst = kvm_guest_factory(cdrom=installer_iso, boot="cdrom", disk_size="600M", ssh=False)
    match = inst.console.expect(
        r"ERROR: disk too small: /dev/vda has (\d+) MiB, the system needs (\d+) MiB", timeout=180
    )
    assert int(match.group(1)) == 600 < int(match.group(2))
    inst.wait_for_shutdown(timeout=60)
    assert "Hostname: " not in inst.console.read_all()  # it stopped before asking


def _answer_and_install(inst: Guest, grub_phase: str) -> None:
    """Answer the two questions, follow the phases to the end and the power-off."""
    inst.console.expect(r"Hostname: ", timeout=60)
    inst.console.send(f"{HOSTNAME}\n")
    inst.console.expect(r"Message of the day: ", timeout=30)
    inst.console.send(f"{MOTD}\n")
    for phase in ("partitioning", "making the ext4 file system", "copying the system",
                  grub_phase):  # fmt: skip
        # Copying 655 MiB took 55 to 70 s on a quiet host, over 300 s at load 18.
        inst.console.expect(re.escape(phase), timeout=900)
    inst.console.expect(r"Installation complete", timeout=120)
    inst.wait_for_shutdown(timeout=60)
    assert "ERROR" not in inst.console.read_all()


def test_install_under_uefi_with_tpm_boots_installed_disk_under_uefi(
    kvm_guest_factory: Factory, installer_iso: Path
) -> None:
    if not boots_under_uefi(installer_iso):
        pytest.skip("the image has no EFI system partition: its install ISO boots under BIOS only")
    inst = kvm_guest_factory(
        cdrom=installer_iso, boot="cdrom", disk_size="3G", ssh=False, firmware="uefi", tpm=True
    )
    # OVMF booted the CD's EFI entry (shim, GRUB, the kernel): the installer sees
    # UEFI and the TPM. (GRUB's "Booting `pytest-kvm mini installer'" comes first:
    # the banner alone would match it.)
    inst.console.expect(r"installer: \[[\d.]+s\] firmware: uefi", timeout=300)
    inst.console.expect(r"TPM 2\.0 found: /dev/tpm0", timeout=30)
    _answer_and_install(inst, "installing GRUB for UEFI (shim) on /dev/vda15")

    # A new machine (fresh UEFI variables: no boot entry for this disk) with a TPM:
    # the firmware boots the removable path the installer wrote.
    g = inst.boot_installed(firmware="uefi", tpm=True)
    assert g.firmware == "uefi"
    g.succeed("test -d /sys/firmware/efi/efivars")
    assert g.succeed("hostname").strip() == HOSTNAME
    assert g.succeed("findmnt -n -o SOURCE,FSTYPE /").split() == ["/dev/vda1", "ext4"]
    # The ESP, mounted from fstab, with shim and GRUB where Debian and firmware look.
    assert g.succeed("findmnt -n -o SOURCE,FSTYPE /boot/efi").split() == ["/dev/vda15", "vfat"]
    esp = g.succeed("cd /boot/efi && find EFI -type f | sort").split()
    assert esp == [
        "EFI/BOOT/BOOTX64.EFI",
        "EFI/BOOT/grub.cfg",
        "EFI/BOOT/grubx64.efi",
        "EFI/debian/grub.cfg",
        "EFI/debian/grubx64.efi",
        "EFI/debian/shimx64.efi",
    ]
    parttype = g.succeed("lsblk -n -o PARTTYPE /dev/vda15").strip().lower()
    assert parttype == "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"  # an EFI system partition
    # The firmware says which boot option it started (BootCurrent): the disk's.
    g.succeed("test -e /sys/firmware/efi/efivars/BootCurrent-8be4df61-93ca-11d2-aa0d-00e098032b8c")
    g.succeed("test -c /dev/tpmrm0")
    assert g.succeed("cat /sys/class/tpm/tpm0/tpm_version_major").strip() == "2"
