"""The mini installer's ISO layout (tests/integration/support/mini_installer.py): the
El Torito entries and nested directories, on a few fake files (no libguestfs)."""

from __future__ import annotations

from pathlib import Path

import pycdlib

from tests.integration.support import mini_installer as m


def _files() -> dict[str, bytes]:
    return {
        "isolinux/isolinux.bin": b"\0" * 2048,
        "vmlinuz": b"kernel",
        f"{m.ESP_DIR}/BOOTX64.EFI": b"MZ shim",
        "EFI/debian/grub.cfg": m._cd_grub_cfg().encode(),
        m.EFI_IMAGE: b"\0" * 4096,
    }


def test_iso_has_a_bios_and_an_efi_boot_entry(tmp_path: Path) -> None:
    archive = tmp_path / "root.tar.zst"
    archive.write_bytes(b"tar")
    iso = tmp_path / "installer.iso"
    m._write_iso(iso, _files(), archive, efi=True)
    assert m.boots_under_uefi(iso)
    cd = pycdlib.PyCdlib()
    cd.open(str(iso))
    try:
        catalog = cd.eltorito_boot_catalog
        assert catalog.validation_entry.platform_id == 0  # isolinux, BIOS
        assert [s.platform_id for s in catalog.sections] == [0xEF]  # the EFI image
        # nested directories keep their Rock Ridge names: GRUB finds its menu there
        cd.get_record(rr_path="/EFI/debian/grub.cfg")
        cd.get_record(rr_path=f"/{m.ESP_DIR}/BOOTX64.EFI")
    finally:
        cd.close()


def test_iso_without_an_esp_boots_under_bios_only(tmp_path: Path) -> None:
    archive = tmp_path / "root.tar.zst"
    archive.write_bytes(b"tar")
    iso = tmp_path / "installer.iso"
    files = {k: v for k, v in _files().items() if k == "isolinux/isolinux.bin"}
    m._write_iso(iso, files, archive, efi=False)
    assert not m.boots_under_uefi(iso)


def test_cd_menu_finds_the_cd_by_its_label() -> None:
    menu = m._cd_grub_cfg()
    assert f"search --no-floppy --label --set=root {m.VOLUME_ID}" in menu
    assert "linux ($root)/vmlinuz console=ttyS0" in menu
