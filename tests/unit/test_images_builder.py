"""The builder's pure parts: GRUB placement, sparse copy, command line, preflight."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from pytest_kvm.errors import ImageError, KvmUnavailable
from pytest_kvm.images import builder, rootfs
from pytest_kvm.images import recipe as recipe_mod
from pytest_kvm.images.bootdisk import copy_sparse
from pytest_kvm.images.builder import (
    PARTITION_START,
    build_image,
    install_grub,
    kernel_command_line,
)
from pytest_kvm.images.recipe import Recipe

PARTITION_ENTRY = bytes.fromhex("80202100830a08ff00080000")  # bootable, type 83, LBA 2048


def fake_disk(path: Path) -> None:
    mbr = bytearray(512)
    mbr[0x1B8:0x1BC] = b"\x78\x56\x34\x12"  # disk signature from sfdisk
    mbr[0x1BE : 0x1BE + len(PARTITION_ENTRY)] = PARTITION_ENTRY
    mbr[510:512] = b"\x55\xaa"
    with open(path, "wb") as f:
        f.write(mbr)
        f.truncate(PARTITION_START + 4096)


def fake_boot() -> bytearray:
    boot = bytearray(b"\xeb\x63\x90" + bytes(509))
    struct.pack_into("<Q", boot, 0x5C, 1)
    boot[0x64] = 0xFF
    boot[0x66:0x68] = b"\xeb\x05"
    boot[0x1BE:0x1C0] = b"FL"  # floppy code that must not reach the partition table
    boot[510:512] = b"\x55\xaa"
    return boot


def fake_core(sectors: int) -> bytearray:
    core = bytearray(sectors * 512)
    struct.pack_into("<QHH", core, 500, 2, sectors - 1, 0x820)
    core[512:516] = b"CORE"
    return core


def test_install_grub_places_boot_and_core_like_grub_setup(tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    fake_disk(disk)
    install_grub(disk, fake_boot(), fake_core(3))
    data = disk.read_bytes()
    assert data[0:3] == b"\xeb\x63\x90"
    assert struct.unpack_from("<Q", data, 0x5C) == (1,)  # core.img at LBA 1
    assert data[0x64] == 0xFF  # drive from DL
    assert data[0x66:0x68] == b"\x90\x90"  # drive check patched out, as for hard disks
    assert data[0x1B8:0x1BC] == b"\x78\x56\x34\x12"  # disk signature kept
    assert data[0x1BE : 0x1BE + len(PARTITION_ENTRY)] == PARTITION_ENTRY
    assert data[510:512] == b"\x55\xaa"
    assert struct.unpack_from("<QH", data, 512 + 500) == (2, 2)  # rest of core at LBA 2
    assert data[1024:1028] == b"CORE"


def test_install_grub_refuses_a_core_bigger_than_the_gap(tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    fake_disk(disk)
    with pytest.raises(ImageError, match="gap"):
        install_grub(disk, fake_boot(), fake_core(PARTITION_START // 512))


def test_install_grub_checks_the_blocklist_length(tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    fake_disk(disk)
    core = fake_core(3)
    struct.pack_into("<H", core, 508, 7)
    with pytest.raises(ImageError, match="blocklist"):
        install_grub(disk, fake_boot(), core)


def test_install_grub_needs_a_partition_table(tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(PARTITION_START))
    with pytest.raises(ImageError, match="partition table"):
        install_grub(disk, fake_boot(), fake_core(3))


def test_copy_sparse_keeps_data_at_offset_and_holes(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    with open(src, "wb") as f:
        f.truncate(64 << 20)
        f.seek(1 << 20)
        f.write(b"A" * 4096)
        f.seek((64 << 20) - 4096)
        f.write(b"Z" * 4096)
    with open(dst, "wb") as f:
        f.truncate((64 << 20) + PARTITION_START)
    copy_sparse(src, dst, PARTITION_START)
    with open(dst, "rb") as f:
        f.seek(PARTITION_START + (1 << 20))
        assert f.read(4096) == b"A" * 4096
        f.seek(PARTITION_START + (64 << 20) - 4096)
        assert f.read(4096) == b"Z" * 4096
    assert dst.stat().st_blocks * 512 < 16 << 20  # still sparse


def test_kernel_command_line(tmp_path: Path) -> None:
    recipe = Recipe(name="x", path=tmp_path / "x.toml", suite="bookworm", kernel_args=("quiet",))
    assert kernel_command_line(recipe, "1234") == (
        "root=UUID=1234 ro console=tty0 console=ttyS0,115200n8 no_timer_check quiet"
    )


def test_missing_tools_name_their_debian_packages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(builder.shutil, "which", lambda tool, path=None: None)
    recipe = Recipe(name="x", path=tmp_path / "x.toml", suite="bookworm")
    with pytest.raises(KvmUnavailable) as info:
        build_image(recipe, tmp_path / "out.qcow2", mirror="http://m.example/debian")
    assert "apt-get install mmdebstrap" in str(info.value)
    assert "apt-get install qemu-utils" in str(info.value)
    assert not (tmp_path / "out.qcow2").exists()


def _build(tmp_path: Path, **recipe_args: object) -> builder._Build:
    recipe = Recipe(name="x", path=tmp_path / "x.toml", suite="bookworm", **recipe_args)  # type: ignore[arg-type]
    work = tmp_path / "work"
    (work / "root").mkdir(parents=True)
    return builder._Build(
        recipe, work, "http://m.example/debian", {"mmdebstrap": "mmdebstrap"}, print
    )


def _config(build: builder._Build) -> rootfs.RootConfig:
    return rootfs.RootConfig(build.recipe, build.root, build.root_uuid, "chroot", build._run, print)


def _bootstrap_argv(build: builder._Build, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    seen: list[list[str]] = []
    monkeypatch.setattr(build, "_stream", lambda argv, prefix: seen.append(list(argv)))
    build.bootstrap()
    (argv,) = seen
    return argv


def test_bootstrap_checks_valid_until_unless_the_recipe_says_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    default = _bootstrap_argv(_build(tmp_path / "a"), monkeypatch)
    assert not any("Check-Valid-Until" in arg for arg in default)
    assert default[-3:] == ["bookworm", str(tmp_path / "a/work/root"), "http://m.example/debian"]
    relaxed = _bootstrap_argv(_build(tmp_path / "b", check_valid_until=False), monkeypatch)
    assert '--aptopt=Acquire::Check-Valid-Until "false"' in relaxed
    assert relaxed.index('--aptopt=Acquire::Check-Valid-Until "false"') < relaxed.index("bookworm")


def test_networkd_configuration(tmp_path: Path) -> None:
    build = _build(tmp_path)
    wait_online = build.root / "usr/lib/systemd/systemd-networkd-wait-online"
    wait_online.parent.mkdir(parents=True)
    wait_online.touch()
    _config(build)._configure_networkd()
    network = (build.root / "etc/systemd/network/10-dhcp.network").read_text()
    assert "Name=en* eth*" in network and "DHCP=yes" in network
    assert "\nKeepConfiguration=dhcp\n" in network  # the address never drops
    dropin = (
        build.root / "etc/systemd/system/systemd-networkd-wait-online.service.d/pytest-kvm.conf"
    )
    assert "ExecStart=/usr/lib/systemd/systemd-networkd-wait-online --any" in dropin.read_text()
    assert not (build.root / "etc/network/interfaces").exists()


def test_ifupdown_configuration_is_dhcp_on_eth0(tmp_path: Path) -> None:
    build = _build(tmp_path, network="ifupdown", kernel_args=("net.ifnames=0",))
    ifup = build.root / "usr/sbin/ifup"
    ifup.parent.mkdir(parents=True)
    ifup.touch()
    _config(build)._configure_ifupdown()
    interfaces = (build.root / "etc/network/interfaces").read_text()
    assert "auto lo\niface lo inet loopback\n" in interfaces
    assert "auto eth0\niface eth0 inet dhcp\n" in interfaces
    assert "source /etc/network/interfaces.d/*" in interfaces
    assert not (build.root / "etc/systemd/network").exists()


def test_ifupdown_configuration_needs_ifupdown_installed(tmp_path: Path) -> None:
    build = _build(tmp_path, network="ifupdown", kernel_args=("net.ifnames=0",))
    with pytest.raises(ImageError, match="sbin/ifup not found"):
        _config(build)._configure_ifupdown()


def test_cloud_init_is_told_who_configures_the_network() -> None:
    assert set(rootfs._NETWORK_COMMENT) == set(recipe_mod._NETWORKS)
    assert "systemd-networkd" in rootfs._NETWORK_COMMENT["networkd"]
    assert "ifupdown" in rootfs._NETWORK_COMMENT["ifupdown"]
