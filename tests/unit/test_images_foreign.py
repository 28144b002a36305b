"""Foreign-architecture image builds: binfmt_misc for qemu-user, debootstrap's
arguments, dpkg's filters, the stage's files, the GPT without BIOS boot."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pytest_kvm.errors import ImageError, KvmUnavailable
from pytest_kvm.images import crossbuild, foreign
from pytest_kvm.images.recipe import Recipe
from pytest_kvm.images.rootfs import kernel_command_line

ARM64 = foreign.ARCHES["arm64"]
# Debian's qemu-user-static line, as /usr/lib/binfmt.d/qemu-aarch64.conf holds it
CONF_LINE = (
    r":qemu-aarch64:M::\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00"
    r"\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff"
    r"\xff\xff\xff\xff\xfe\xff\xff\xff:/usr/libexec/qemu-binfmt/aarch64-binfmt-P:OPF"
)


def _entry(flags: str, state: str = "enabled") -> str:
    return (
        f"{state}\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\n"
        f"flags: {flags}\noffset 0\nmagic 7f454c46\n"
    )


@pytest.fixture()
def binfmt(tmp_path: Path) -> Path:
    """A stand-in for /proc/sys/fs/binfmt_misc that records what is registered."""
    d = tmp_path / "binfmt_misc"
    d.mkdir()
    (d / "register").write_text("")
    return d


def test_a_registered_entry_with_the_f_flag_is_enough(binfmt: Path) -> None:
    (binfmt / "qemu-aarch64").write_text(_entry("POF"))
    assert foreign.binfmt_problem(ARM64, binfmt) is None
    said: list[str] = []
    foreign.ensure_binfmt(ARM64, said.append, binfmt_dir=binfmt, conf_dir=Path("/nowhere"))
    assert said == [] and (binfmt / "register").read_text() == ""


@pytest.mark.parametrize(
    ("setup", "problem"),
    [
        ("unmounted", "binfmt_misc is not mounted"),
        ("missing", "no qemu-aarch64 entry"),
        ("disabled", "is disabled"),
        ("no-f", "lacks the F flag"),
    ],
)
def test_what_is_missing_is_named(binfmt: Path, setup: str, problem: str) -> None:
    if setup == "unmounted":
        (binfmt / "register").unlink()
    elif setup == "disabled":
        (binfmt / "qemu-aarch64").write_text(_entry("POF", "disabled"))
    elif setup == "no-f":
        (binfmt / "qemu-aarch64").write_text(_entry("OC"))
    found = foreign.binfmt_problem(ARM64, binfmt)
    assert found is not None and problem in found


def test_without_qemu_user_static_the_error_names_the_package(binfmt: Path, tmp_path: Path) -> None:
    with pytest.raises(KvmUnavailable) as info:
        foreign.ensure_binfmt(ARM64, print, binfmt_dir=binfmt, conf_dir=tmp_path / "none")
    assert "apt-get install qemu-user-static" in str(info.value)
    assert "cannot build arm64 images: binfmt_misc has no qemu-aarch64 entry" in str(info.value)


def test_someone_elses_entry_without_f_is_not_replaced(binfmt: Path, tmp_path: Path) -> None:
    (tmp_path / "qemu-aarch64.conf").write_text(CONF_LINE + "\n")
    (binfmt / "qemu-aarch64").write_text(_entry("OC"))
    with pytest.raises(KvmUnavailable, match="lacks the F flag"):
        foreign.ensure_binfmt(ARM64, print, binfmt_dir=binfmt, conf_dir=tmp_path)
    assert (binfmt / "register").read_text() == ""


@pytest.mark.skipif(os.geteuid() != 0, reason="registration is only tried as root")
def test_as_root_the_packages_line_is_registered(binfmt: Path, tmp_path: Path) -> None:
    (tmp_path / "qemu-aarch64.conf").write_text("# comment\n" + CONF_LINE + "\n")
    said: list[str] = []
    with pytest.raises(KvmUnavailable, match="no qemu-aarch64 entry"):
        # the stand-in directory does not create the entry the kernel would
        foreign.ensure_binfmt(ARM64, said.append, binfmt_dir=binfmt, conf_dir=tmp_path)
    assert (binfmt / "register").read_text() == CONF_LINE + "\n"
    assert said == [f"stage: registered {tmp_path / 'qemu-aarch64.conf'} with binfmt_misc"]


def test_a_failed_stage_carries_debootstraps_log(tmp_path: Path) -> None:
    log = tmp_path / foreign.DEBOOTSTRAP_LOG
    log.parent.mkdir()
    log.write_text("".join(f"line {i}\n" for i in range(100)) + "dpkg: error processing x\n")
    error = foreign.stage_error(ImageError("building 'a': exit 1"), tmp_path)
    assert str(error).startswith("building 'a': exit 1\n--- debootstrap/debootstrap.log")
    assert str(error).endswith("dpkg: error processing x") and "line 70" not in str(error)
    assert str(foreign.stage_error(ImageError("e"), tmp_path / "none")) == "e"


def test_the_second_stage_is_debootstraps_own_in_a_chroot() -> None:
    assert foreign.second_stage_argv("chroot", Path("/w/first")) == [
        "chroot",
        "/w/first",
        "/debootstrap/debootstrap",
        "--second-stage",
    ]


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
    assert (tmp_path / foreign.POLICY_RC_D).read_text().endswith("exit 101\n")
    assert "force-unsafe-io" in (tmp_path / foreign.DPKG_UNSAFE_IO).read_text()
    kept = (tmp_path / "etc/dpkg/dpkg.cfg.d/99pytest-kvm").read_text()
    assert "path-exclude=/usr/share/doc/*" in kept
    (tmp_path / "var/cache/apt/archives").mkdir(parents=True)
    (tmp_path / "var/cache/apt/archives/x_1_arm64.deb").write_text("")
    crossbuild.unstage_files(tmp_path)
    assert not (tmp_path / foreign.POLICY_RC_D).exists()
    assert not (tmp_path / foreign.DPKG_UNSAFE_IO).exists()
    assert list((tmp_path / "var/cache/apt/archives").iterdir()) == []
    assert kept == (tmp_path / "etc/dpkg/dpkg.cfg.d/99pytest-kvm").read_text()  # kept


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
    with pytest.raises(KvmUnavailable) as info:
        crossbuild.find_foreign_tools("arm64", "/nowhere")
    assert "debootstrap (apt-get install debootstrap)" in str(info.value)
    with pytest.raises(ImageError, match="no foreign-architecture build for 'mips'"):
        crossbuild.find_foreign_tools("mips", "/nowhere")


def test_the_package_index_keeps_only_the_downloaded_packages(tmp_path: Path) -> None:
    (tmp_path / "debootstrap").mkdir()
    (tmp_path / "debootstrap/debpaths").write_text(
        "bash /var/cache/apt/archives/bash_5_arm64.deb\n"
        "libc6 /var/cache/apt/archives/libc6_2_arm64.deb\n"
    )
    lists = tmp_path / "var/lib/apt/lists"
    lists.mkdir(parents=True)
    index = lists / "m_dists_bookworm_main_binary-arm64_Packages"
    stanza = "Package: {}\nVersion: 1\nFilename: pool/{}.deb\n"
    names = ["0ad", "bash", "bash-completion", "libc6", "zsh"]
    index.write_text("\n".join(stanza.format(n, n) for n in names))
    (lists / "m_dists_bookworm_Release").write_text("Package: zsh\n")  # not an index
    assert crossbuild.trim_package_indexes(tmp_path) == 2
    text = index.read_text()
    assert "Package: bash\nVersion: 1\nFilename: pool/bash.deb" in text
    assert "Package: libc6\n" in text
    assert "bash-completion" not in text and "zsh" not in text and "0ad" not in text
    assert (lists / "m_dists_bookworm_Release").read_text() == "Package: zsh\n"
