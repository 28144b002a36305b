"""Foreign-architecture image builds: the cpio writer, the stage guest's command line
and script, debootstrap's arguments, dpkg's filters, the GPT without BIOS boot."""

from __future__ import annotations

import io
import os
import stat
import subprocess
from pathlib import Path

import pytest

from pytest_kvm.errors import ImageError
from pytest_kvm.images import crossbuild, foreign
from pytest_kvm.images.cpio import CpioWriter, header
from pytest_kvm.images.recipe import Recipe
from pytest_kvm.images.rootfs import kernel_command_line


def parse_newc(data: bytes) -> list[dict[str, object]]:
    """A reader written from the format's description (kernel's initramfs-buffer-format)."""
    entries: list[dict[str, object]] = []
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701", f"bad magic at {pos}"
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        ino, mode, uid, gid, nlink, mtime, size = fields[:7]
        namesize = fields[11]
        name_start = pos + 110
        name = data[name_start : name_start + namesize - 1].decode()
        pos = name_start + namesize
        pos += -pos % 4
        body = data[pos : pos + size]
        pos += size
        pos += -pos % 4
        if name == "TRAILER!!!":
            assert len(data) % 512 == 0
            return entries
        entries.append(
            {
                "name": name,
                "ino": ino,
                "mode": mode,
                "uid": uid,
                "gid": gid,
                "nlink": nlink,
                "mtime": mtime,
                "body": body,
                "rdev": (fields[9], fields[10]),
            }
        )


def test_header_is_newc_and_padded() -> None:
    head = header("init", ino=7, mode=stat.S_IFREG | 0o755, size=3, mtime=0x10)
    assert head.startswith(b"07070100000007000081ED")
    assert len(head) % 4 == 0
    assert head[110:115] == b"init\0"
    with pytest.raises(ValueError, match="32 bits"):
        header("big", ino=1, mode=0, size=1 << 32)


def test_a_tree_round_trips_with_owners_links_and_devices(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/tool").write_bytes(b"#!/bin/sh\n")
    (root / "usr/bin/tool").chmod(0o755)
    os.link(root / "usr/bin/tool", root / "usr/bin/alias")
    (root / "bin").symlink_to("usr/bin")
    (root / "etc").mkdir()
    (root / "etc/shadow").write_text("root:*:1::::::\n")
    (root / "etc/shadow").chmod(0o640)
    if os.geteuid() == 0:
        os.chown(root / "etc/shadow", 0, 42)
    os.utime(root / "etc/shadow", (1_700_000_000, 1_700_000_000))

    out = io.BytesIO()
    writer = CpioWriter(out)
    writer.add_tree(root)
    writer.add_bytes("init", b"#!/bin/sh\necho hi\n", 0o755)
    writer.finish()
    entries = {e["name"]: e for e in parse_newc(out.getvalue())}

    names = list(entries)
    # parents before children: the kernel makes no missing directories
    assert names.index("usr") < names.index("usr/bin") < names.index("usr/bin/tool")
    assert stat.S_ISLNK(entries["bin"]["mode"]) and entries["bin"]["body"] == b"usr/bin"
    assert "bin/tool" not in entries  # a symlinked directory is not followed
    shadow = entries["etc/shadow"]
    assert stat.S_IMODE(shadow["mode"]) == 0o640
    assert shadow["mtime"] == 1_700_000_000
    if os.geteuid() == 0:
        assert shadow["gid"] == 42
    # one inode, two names: the data once, both entries with nlink 2
    tool, alias = entries["usr/bin/alias"], entries["usr/bin/tool"]
    assert tool["ino"] == alias["ino"] and tool["nlink"] == alias["nlink"] == 2
    assert sorted([tool["body"], alias["body"]]) == [b"", b"#!/bin/sh\n"]
    assert entries["init"]["body"] == b"#!/bin/sh\necho hi\n"
    assert writer.entries == len(entries)


def test_device_nodes_keep_major_and_minor() -> None:
    if os.geteuid() != 0:
        pytest.skip("mknod needs root")
    out = io.BytesIO()
    writer = CpioWriter(out)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        os.mknod(Path(tmp, "console"), stat.S_IFCHR | 0o600, os.makedev(5, 1))
        writer.add_tree(Path(tmp))
    writer.finish()
    (console,) = parse_newc(out.getvalue())
    assert stat.S_ISCHR(console["mode"]) and console["rdev"] == (5, 1)


def test_write_initrd_skips_nothing_and_counts(tmp_path: Path) -> None:
    (tmp_path / "t/a").mkdir(parents=True)
    (tmp_path / "t/a/f").write_text("x")
    assert crossbuild.write_initrd(tmp_path / "t", tmp_path / "t.cpio") == 2
    assert [e["name"] for e in parse_newc((tmp_path / "t.cpio").read_bytes())] == ["a", "a/f"]


def test_stage_guest_command_line_for_arm64(tmp_path: Path) -> None:
    argv = foreign.qemu_argv(
        foreign.ARCHES["arm64"],
        "/usr/bin/qemu-system-aarch64",
        kernel=tmp_path / "vmlinuz",
        initrd=tmp_path / "tree.cpio",
        output=tmp_path / "out.raw",
        console_log=tmp_path / "console.log",
        memory_mib=4096,
        cpus=2,
    )
    joined = " ".join(argv)
    assert argv[:5] == ["/usr/bin/qemu-system-aarch64", "-M", "virt", "-cpu", "cortex-a72"]
    assert "console=ttyAMA0 rdinit=/init" in joined
    assert f"file={tmp_path}/out.raw,format=raw" in joined
    assert "virtio-blk-pci,drive=out" in argv
    assert "-nodefaults" in argv and "-no-reboot" in argv
    # no network at all: the stage needs none
    assert not any(a.startswith(("-netdev", "-nic")) for a in argv)
    assert argv[argv.index("-m") + 1] == "4096" and argv[argv.index("-smp") + 1] == "2"


def test_riscv64_uses_its_own_console() -> None:
    riscv = foreign.ARCHES["riscv64"]
    assert riscv.qemu == "qemu-system-riscv64" and riscv.console == "ttyS0"


def test_stage_script_is_valid_shell_and_reports_a_result() -> None:
    script = foreign.stage_script(["./var/tmp/x"])
    subprocess.run(["sh", "-n"], input=script.encode(), check=True)
    assert "/debootstrap/debootstrap --second-stage" in script
    assert "--file=/dev/vda" in script and "--one-file-system" in script
    assert " --exclude=./init --exclude=./var/tmp/x . " in script
    assert script.index("--second-stage") < script.index("--file=/dev/vda")
    # the build-only files are gone before the tree is written out
    assert script.index(foreign.POLICY_RC_D) < script.index("--file=/dev/vda")
    assert 'finish "failed: debootstrap' in script and "finish ok" in script
    # the guest ends by a reboot (-no-reboot ends the emulator), not sysrq's power-off
    assert "echo b >/proc/sysrq-trigger" in script


@pytest.mark.parametrize(
    ("console", "result"),
    [
        ("boot\npytest-kvm-stage: result ok\r\n[ 9.1] reboot: Power down\n", "ok"),
        ("pytest-kvm-stage: result failed: tar onto /dev/vda (exit 2)\n", None),
        ("I: Configuring libc6...\n[ 3.0] Kernel panic\n", None),
    ],
)
def test_find_result(console: str, result: str | None) -> None:
    found = foreign.find_result(console)
    if result is None and "result" in console:
        assert found == "failed: tar onto /dev/vda (exit 2)"
    else:
        assert found == result


def test_a_guest_without_a_result_fails_with_the_console_tail(tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    console.write_text("I: Configuring base-files...\nKernel panic - not syncing\n")
    guest = foreign.StageGuest(
        ["true"], console, tmp_path / "qemu.log", name="debian-12-arm64", progress=lambda m: None
    )
    with pytest.raises(ImageError, match="without a result") as info:
        guest.run()
    assert "Kernel panic - not syncing" in str(info.value)
    assert guest.proc is not None and guest.proc.returncode == 0
    guest.stop()  # idempotent


def test_a_wedged_guest_is_stopped_at_the_deadline(tmp_path: Path) -> None:
    guest = foreign.StageGuest(
        ["sleep", "600"],
        tmp_path / "console.log",
        tmp_path / "qemu.log",
        name="x",
        progress=lambda m: None,
        deadline=0.5,
    )
    with pytest.raises(ImageError, match="still runs after"):
        guest.run()
    assert guest.proc is not None and guest.proc.poll() is not None  # ended, by its PID


def test_a_guest_is_stopped_by_its_cpu_limit_not_the_clock(tmp_path: Path) -> None:
    # busy for seconds: over a 0.3 CPU-second limit long before the wall deadline
    guest = foreign.StageGuest(
        ["sh", "-c", "while :; do :; done"],
        tmp_path / "console.log",
        tmp_path / "qemu.log",
        name="x",
        progress=lambda m: None,
        cpu_limit=0.3,
    )
    with pytest.raises(ImageError, match=r"CPU-seconds \(limits 21600s, 0 CPU-seconds\)"):
        guest.run()
    assert guest.proc is not None and guest.proc.poll() is not None


def test_process_cpu_seconds() -> None:
    assert foreign.process_cpu_seconds(os.getpid()) > 0
    assert foreign.process_cpu_seconds(2**22 + 12345) == 0.0


def test_debootstrap_argv_maps_the_variant() -> None:
    common = {
        "architecture": "arm64",
        "components": ("main",),
        "packages": ("openssh-server", "linux-image-arm64"),
        "suite": "bookworm",
        "target": Path("/w/first"),
        "mirror": "http://m.example/debian",
    }
    argv = crossbuild.debootstrap_argv("debootstrap", variant="important", **common)  # type: ignore[arg-type]
    assert argv[:4] == ["debootstrap", "--foreign", "--arch=arm64", "--merged-usr"]
    assert not any(a.startswith("--variant") for a in argv)  # its default: important
    assert "--include=openssh-server,linux-image-arm64" in argv
    assert argv[-3:] == ["bookworm", "/w/first", "http://m.example/debian"]
    minbase = crossbuild.debootstrap_argv("debootstrap", variant="required", **common)  # type: ignore[arg-type]
    assert "--variant=minbase" in minbase
    with pytest.raises(ImageError, match="variant 'apt' cannot be built for arm64"):
        crossbuild.debootstrap_argv("debootstrap", variant="apt", **common)  # type: ignore[arg-type]


def test_dpkg_filters_last_match_wins_like_dpkg(tmp_path: Path) -> None:
    excludes = ("/usr/share/doc/*", "/usr/share/man/??/*")
    includes = ("/usr/share/doc/*/copyright",)
    assert crossbuild.excluded("/usr/share/doc/bash/README", excludes, includes)
    assert not crossbuild.excluded("/usr/share/doc/bash/copyright", excludes, includes)
    assert crossbuild.excluded("/usr/share/man/de/man1/ls.1.gz", excludes, includes)
    assert not crossbuild.excluded("/usr/share/man/man1/ls.1.gz", excludes, includes)
    root = tmp_path / "root"
    for rel in ("usr/share/doc/bash/README", "usr/share/doc/bash/copyright", "usr/bin/bash"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x")
    assert crossbuild.prune_excluded(root, excludes, includes) == 1
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) == [
        "usr/bin/bash",
        "usr/share/doc/bash/copyright",
    ]
    config = crossbuild.dpkg_filter_config(excludes, includes)
    assert "path-exclude=/usr/share/doc/*\n" in config
    assert config.index("path-exclude") < config.index("path-include=/usr/share/doc/*/copyright")


def test_stage_files(tmp_path: Path) -> None:
    crossbuild.stage_files(tmp_path, ("/usr/share/doc/*",), ())
    assert (tmp_path / "init").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / foreign.POLICY_RC_D).read_text().endswith("exit 101\n")
    assert "force-unsafe-io" in (tmp_path / foreign.DPKG_UNSAFE_IO).read_text()
    kept = (tmp_path / "etc/dpkg/dpkg.cfg.d/99pytest-kvm").read_text()
    assert "path-exclude=/usr/share/doc/*" in kept


def test_foreign_gpt_has_no_bios_boot_partition() -> None:
    script = crossbuild.sfdisk_script(3 << 30, "d-guid", "r-guid")
    assert "disk.raw14" not in script and "21686148" not in script
    assert "disk.raw1 : start=65536," in script and "attrs=LegacyBIOSBootable" in script
    assert "disk.raw15 : start=4096, size=61440, type=C12A7328" in script


def test_arm64_esp_files_are_the_arm64_packages() -> None:
    files = crossbuild.EFI_FILES["arm64"]
    assert set(files) == {"shim-signed", "grub-efi-arm64-signed"}
    assert all("aa64" in path for path in files.values())
    assert crossbuild.EFI_TARGETS["arm64"]["shim-signed"] == "::/EFI/BOOT/BOOTAA64.EFI"


def test_kernel_command_line_per_architecture(tmp_path: Path) -> None:
    def line(arch: str) -> str:
        recipe = Recipe(name="x", path=tmp_path / "x.toml", suite="bookworm", architecture=arch)
        return kernel_command_line(recipe, "1234")

    assert line("arm64") == "root=UUID=1234 ro console=tty0 console=ttyAMA0,115200n8"
    assert line("riscv64") == "root=UUID=1234 ro console=tty0 console=ttyS0,115200n8"
    assert line("amd64").endswith("console=ttyS0,115200n8 no_timer_check")


def test_missing_foreign_tools_name_their_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(crossbuild.shutil, "which", lambda tool, path=None: None)
    from pytest_kvm.errors import KvmUnavailable

    with pytest.raises(KvmUnavailable) as info:
        crossbuild.find_foreign_tools("arm64", "/nowhere")
    assert "qemu-system-aarch64 (apt-get install qemu-system-arm)" in str(info.value)
    assert "debootstrap (apt-get install debootstrap)" in str(info.value)
    with pytest.raises(KvmUnavailable, match="qemu-system-misc"):
        crossbuild.find_foreign_tools("riscv64", "/nowhere")
