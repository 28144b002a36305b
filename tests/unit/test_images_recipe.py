"""Loading and validating catalog recipes (temp files only)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_kvm.errors import ImageError
from pytest_kvm.images import recipe as recipe_mod
from pytest_kvm.images.recipe import (
    RECIPES_ENV,
    catalog_names,
    download_names,
    load_recipe,
    load_recipe_file,
    parse_size,
    recipes_dir,
)

MINIMAL = 'suite = "bookworm"\n'


@pytest.fixture
def catalog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "images"
    directory.mkdir()
    monkeypatch.setenv(RECIPES_ENV, str(directory))
    return directory


def test_the_shipped_catalog_loads() -> None:
    # the package's own catalog (pytest_kvm/images/catalog)
    assert "debian-12" in catalog_names()
    recipe = load_recipe("debian-12")
    assert recipe.name == "debian-12"
    assert recipe.suite == "bookworm"
    assert recipe.path == recipes_dir() / "debian-12.toml"
    assert "openssh-server" in recipe.packages
    assert "cloud-init" in recipe.packages
    assert recipe.disk_size == 3 * 1024**3


def test_the_shipped_catalog_has_each_release_and_a_sysvinit_image() -> None:
    suites = {name: load_recipe(name).suite for name in catalog_names()}
    assert {
        "debian-11": "bullseye",
        "debian-12": "bookworm",
        "debian-13": "trixie",
        "debian-testing": "testing",
        "debian-12-sysvinit": "bookworm",
    }.items() <= suites.items()
    # bullseye has resolved inside systemd, no separate package
    assert "systemd-resolved" not in load_recipe("debian-11").packages
    assert "systemd-resolved.service" in load_recipe("debian-11").enable_units
    # cloud-init >= 24.3 runs all stages in one process that waits for the
    # local stage's unit: masking it would hang the boot
    for name in ("debian-13", "debian-testing"):
        assert "cloud-init-local.service" not in load_recipe(name).mask_units
    # testing moves: a snapshot mirror's Release file has expired
    assert not load_recipe("debian-testing").check_valid_until
    sysv = load_recipe("debian-12-sysvinit")
    assert "sysvinit-core" in sysv.packages and "systemd-sysv" not in sysv.packages
    assert (sysv.network, sysv.enable_units, sysv.mask_units) == ("ifupdown", (), ())
    assert "net.ifnames=0" in sysv.kernel_args
    # a real Debian system's package set (issue 21), and the small one kept apart
    for name in ("debian-11", "debian-12", "debian-13"):
        full = load_recipe(name)
        assert full.variant == "important" and "curl" in full.packages
        assert "networking.service" in full.disable_units
    assert {"cron", "iputils-ping", "tzdata", "curl"} <= set(sysv.packages)
    minimal = load_recipe("debian-12-minimal")
    assert minimal.variant == "apt" and "curl" not in minimal.packages


def test_the_foreign_architecture_images() -> None:
    arm64 = load_recipe("debian-12-arm64")
    assert (arm64.suite, arm64.architecture, arm64.variant) == ("bookworm", "arm64", "important")
    assert "linux-image-arm64" in arm64.packages
    # the same package set as debian-12, but the kernel, and the provider of a
    # virtual package that debootstrap (unlike apt) does not resolve
    native = load_recipe("debian-12")
    assert set(arm64.packages) - set(native.packages) == {
        "linux-image-arm64",
        "python3-cffi-backend",
    }
    riscv64 = load_recipe("debian-13-riscv64")
    assert (riscv64.suite, riscv64.architecture) == ("trixie", "riscv64")
    assert set(riscv64.packages) ^ set(load_recipe("debian-13").packages) == {
        "linux-image-riscv64",
        "linux-image-amd64",
        "python3-cffi-backend",
    }
    # trixie's cloud-init waits for its local stage's unit: never masked
    assert "cloud-init-local.service" not in riscv64.mask_units


def test_debian_12_keeps_its_cache_key() -> None:
    # Its cached image and CI depend on this; change it only on purpose
    # (builder version 5: no_timer_check; 4, issue 21: a real system's packages, /boot/efi).
    assert load_recipe("debian-12").digest().startswith("b5baca4b6d6e"), (
        "debian-12's recipe digest changed: every cached debian-12 image is rebuilt"
    )


def test_recipes_dir_defaults_to_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    # Package data, found next to the installed module (a wheel has no top-level images/).
    monkeypatch.delenv(RECIPES_ENV, raising=False)
    assert recipes_dir() == Path(recipe_mod.__file__).resolve().parent / "catalog"
    assert {"debian-12", "debian-13"} <= set(catalog_names())
    assert "ubuntu-24.04" in download_names()


def test_catalog_names_are_sorted_stems(catalog: Path) -> None:
    for name in ("zeta", "alpha-1"):
        (catalog / f"{name}.toml").write_text(MINIMAL)
    (catalog / "README.md").write_text("not a recipe")
    assert catalog_names() == ["alpha-1", "zeta"]


def test_unknown_name_lists_the_known_ones(catalog: Path) -> None:
    (catalog / "debian-12.toml").write_text(MINIMAL)
    (catalog / "debian-13.toml").write_text(MINIMAL)
    with pytest.raises(ImageError) as info:
        load_recipe("fedora-40")
    assert str(info.value) == "unknown catalog image 'fedora-40'; known: debian-12, debian-13"


def test_unknown_name_in_an_empty_catalog(catalog: Path) -> None:
    with pytest.raises(ImageError, match="unknown catalog image 'x'; known: none"):
        load_recipe("x")


def test_path_like_names_are_not_loaded(catalog: Path) -> None:
    (catalog / "ok.toml").write_text(MINIMAL)
    with pytest.raises(ImageError, match="unknown catalog image"):
        load_recipe("../images/ok")


def test_defaults(catalog: Path) -> None:
    (catalog / "mini.toml").write_text(MINIMAL)
    recipe = load_recipe("mini")
    assert recipe.components == ("main",)
    assert recipe.variant == "apt"
    assert recipe.hostname == "debian"
    assert recipe.kernel_args == ()
    assert recipe.initramfs_modules == "most"
    assert recipe.network == "networkd"
    assert recipe.check_valid_until is True


def test_ifupdown_network(catalog: Path) -> None:
    (catalog / "sysv.toml").write_text(
        MINIMAL + 'network = "ifupdown"\nkernel_args = ["net.ifnames=0"]\n'
        "check_valid_until = false\n"
    )
    recipe = load_recipe("sysv")
    assert (recipe.network, recipe.check_valid_until) == ("ifupdown", False)


def test_full_recipe(catalog: Path) -> None:
    (catalog / "full.toml").write_text(
        """
description = "everything"
suite = "trixie"
components = ["main", "contrib"]
variant = "minbase"
packages = ["openssh-server", "linux-image-amd64"]
disk_size = "4GiB"
hostname = "box"
kernel_args = ["quiet", "net.ifnames=0"]

[dpkg]
path_exclude = ["/usr/share/doc/*"]
path_include = ["/usr/share/doc/*/copyright"]

[initramfs]
modules = "list"
drivers = ["virtio_blk", "ext4"]
compress = "lz4"

[units]
enable = ["ssh.service"]
disable = ["apt-daily.timer"]
mask = ["cloud-init-local.service"]
"""
    )
    r = load_recipe("full")
    assert (r.suite, r.variant, r.hostname) == ("trixie", "minbase", "box")
    assert r.components == ("main", "contrib")
    assert r.disk_size == 4 * 1024**3
    assert r.kernel_args == ("quiet", "net.ifnames=0")
    assert r.dpkg_path_exclude == ("/usr/share/doc/*",)
    assert r.initramfs_drivers == ("virtio_blk", "ext4")
    assert r.initramfs_compress == "lz4"
    assert r.enable_units == ("ssh.service",)
    assert r.mask_units == ("cloud-init-local.service",)


def test_digest_follows_the_file_and_the_builder_version(
    catalog: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = catalog / "d.toml"
    path.write_text(MINIMAL)
    first = load_recipe("d").digest()
    assert len(first) == 64
    assert load_recipe("d").digest() == first
    path.write_text(MINIMAL + "# a comment changes the cache key too\n")
    second = load_recipe("d").digest()
    assert second != first
    monkeypatch.setattr(recipe_mod, "BUILDER_VERSION", "999")
    assert load_recipe("d").digest() != second


def test_recipe_is_frozen(catalog: Path) -> None:
    (catalog / "f.toml").write_text(MINIMAL)
    recipe = load_recipe("f")
    with pytest.raises(AttributeError):
        recipe.suite = "sid"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "missing required key 'suite'"),
        ('suite = "bookworm"\nsuit = "x"\n', "unknown key.*'suit'"),
        ('suite = "bookworm"\n[initramfs]\nmodule = "list"\n', r"\[initramfs\].*'module'"),
        ('suite = "bookworm"\npackages = "openssh-server"\n', "'packages' must be a list"),
        ('suite = "bookworm"\npackages = ["Bad Name"]\n', "invalid entry"),
        ('suite = "bookworm"\nvariant = "huge"\n', "'variant' is 'huge'"),
        ('suite = "bookworm"\ndisk_size = "lots"\n', "expected a size"),
        ('suite = "bookworm"\ndisk_size = "100M"\n', "at least 256M"),
        ('suite = "bookworm"\nhostname = "Not_Valid"\n', "not a valid host name"),
        ('suite = "bookworm"\n[initramfs]\nmodules = "list"\n', "needs a 'drivers' list"),
        ('suite = "bookworm"\n[units]\nenable = ["ssh"]\n', "invalid entry 'ssh'"),
        ('suite = "bookworm"\ndpkg = 3\n', r"\[dpkg\] must be a table"),
        ("suite = [", "not valid TOML"),
        ('suite = "bookworm"\nnetwork = "wicked"\n', "'network' is 'wicked'"),
        ('suite = "bookworm"\nnetwork = "ifupdown"\n', "add 'net.ifnames=0'"),
        ('suite = "bookworm"\ncheck_valid_until = "no"\n', "must be true or false"),
        ('suite = "bookworm"\narchitecture = "s390x"\n', "'architecture' is 's390x'"),
        (
            'suite = "bookworm"\narchitecture = "arm64"\nvariant = "important"\n'
            'packages = ["linux-image-amd64"]\n',
            "'linux-image-amd64' is for amd64.*use linux-image-arm64",
        ),
        (
            'suite = "trixie"\narchitecture = "riscv64"\nvariant = "apt"\n',
            "'variant' 'apt' cannot be built for riscv64",
        ),
    ],
)
def test_invalid_recipes_name_file_and_key(catalog: Path, text: str, match: str) -> None:
    path = catalog / "bad.toml"
    path.write_text(text)
    with pytest.raises(ImageError, match=match) as info:
        load_recipe("bad")
    assert str(path) in str(info.value)


def test_unreadable_recipe_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="cannot read recipe"):
        load_recipe_file(tmp_path / "missing.toml")


@pytest.mark.parametrize(
    ("value", "size"),
    [("3G", 3 * 1024**3), ("3GiB", 3 * 1024**3), ("512M", 512 * 1024**2), (1048576, 1048576)],
)
def test_parse_size(value: object, size: int) -> None:
    assert parse_size(value, "here") == size


@pytest.mark.parametrize("value", [True, -1, 0, "3 parsecs", 3.5])
def test_parse_size_rejects(value: object) -> None:
    with pytest.raises(ImageError, match="here"):
        parse_size(value, "here")
