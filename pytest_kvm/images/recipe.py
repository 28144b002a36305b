"""Catalog recipes: the TOML files in ``pytest_kvm/images/catalog/`` that say how to
build an image. They are package data: a wheel or sdist carries them, and they are
found through :mod:`importlib.resources`, wherever the package is installed.

A recipe is data only; :mod:`pytest_kvm.images.builder` turns it into a qcow2.
Loading validates every key, so a typo in a recipe fails at load time with the
file and key named, not half-way through a five-minute build.
"""

from __future__ import annotations

import hashlib
import os
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import ImageError

#: Bump when the builder's output changes for the same recipe: it is part of
#: :meth:`Recipe.digest`, so cached images built by an older builder are rebuilt.
BUILDER_VERSION = "5"  # 4: /boot/efi (the ESP) in /etc/fstab; 5: no_timer_check

RECIPES_ENV = "PYTEST_KVM_RECIPES"

_MIB = 1024 * 1024
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1024, "M": _MIB, "G": 1024 * _MIB, "T": 1024 * 1024 * _MIB}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_UNIT_RE = re.compile(r"^[A-Za-z0-9@:._\\-]+\.(service|socket|timer|target|path|mount)$")
_INITRAMFS_MODULES = ("most", "dep", "netboot", "list")
_INITRAMFS_COMPRESS = ("gzip", "lz4", "lzop", "xz", "zstd", "bzip2", "lzma")
_VARIANTS = ("extract", "custom", "essential", "apt", "required", "minbase", "buildd", "important")
#: Who brings the guest's network up: systemd-networkd (DHCP on en*/eth*), or
#: ifupdown (DHCP on eth0, for images without systemd; needs net.ifnames=0).
_NETWORKS = ("networkd", "ifupdown")
#: Debian architectures the builder makes images for: amd64 natively, the others
#: configured in a chroot under qemu-user-static (pytest_kvm/images/crossbuild.py).
ARCHITECTURES = ("amd64", "arm64", "riscv64")
#: mmdebstrap variants a foreign build can reproduce with debootstrap --foreign.
_FOREIGN_VARIANTS = ("important", "required", "minbase")


@dataclass(frozen=True)
class Recipe:
    """A validated catalog recipe. Sizes are in bytes."""

    name: str  # "debian-12": the file name without .toml
    path: Path  # the .toml file
    suite: str  # "bookworm"
    description: str = ""
    architecture: str = "amd64"
    components: tuple[str, ...] = ("main",)
    variant: str = "apt"  # mmdebstrap --variant
    packages: tuple[str, ...] = ()
    disk_size: int = 3 * 1024 * _MIB  # virtual size of the qcow2
    hostname: str = "debian"
    kernel_args: tuple[str, ...] = ()  # appended after root=, ro and the consoles
    network: str = "networkd"  # one of _NETWORKS
    check_valid_until: bool = True  # apt's Acquire::Check-Valid-Until
    dpkg_path_exclude: tuple[str, ...] = ()  # dpkg --path-exclude, kept in the image
    dpkg_path_include: tuple[str, ...] = ()
    initramfs_modules: str = "most"  # initramfs.conf MODULES=
    initramfs_drivers: tuple[str, ...] = ()  # always in the initramfs
    initramfs_compress: str = "zstd"
    enable_units: tuple[str, ...] = ()
    disable_units: tuple[str, ...] = ()  # skipped if the unit is not installed
    mask_units: tuple[str, ...] = ()
    source: bytes = field(default=b"", repr=False, compare=False)  # the file as read

    def digest(self) -> str:
        """sha256 over the recipe file and :data:`BUILDER_VERSION`: the cache key."""
        h = hashlib.sha256()
        h.update(f"pytest-kvm-builder {BUILDER_VERSION}\n".encode())
        h.update(self.source)
        return h.hexdigest()


#: The catalog's directory inside the package (``pytest_kvm/images/catalog``).
CATALOG_SUBDIR = "catalog"


def packaged_catalog() -> Path:
    """The catalog installed with the package, found through importlib.resources."""
    root = resources.files("pytest_kvm.images").joinpath(CATALOG_SUBDIR)
    if not isinstance(root, Path):  # e.g. a zipped install: recipes need real files
        raise ImageError(f"pytest-kvm's catalog {root} is not a directory on disk")
    return root


def recipes_dir() -> Path:
    """The catalog directory: the package's ``catalog/``, or ``$PYTEST_KVM_RECIPES``."""
    override = os.environ.get(RECIPES_ENV, "").strip()
    if override:
        return Path(override).expanduser()
    return packaged_catalog()


def _entry_names(directory: Path) -> list[str]:
    """Names of the ``*.toml`` entries in a catalog directory, sorted."""
    if not directory.is_dir():
        return []
    return sorted(
        p.stem for p in directory.glob("*.toml") if p.is_file() and _NAME_RE.match(p.stem)
    )


def catalog_names() -> list[str]:
    """Names of the catalog's recipes, sorted."""
    return _entry_names(recipes_dir())


def load_recipe(name: str) -> Recipe:
    """Load and validate the catalog recipe ``name``."""
    known = catalog_names()
    if name not in known:
        listing = ", ".join(known) if known else f"none (no recipes in {recipes_dir()})"
        raise ImageError(f"unknown catalog image {name!r}; known: {listing}")
    return load_recipe_file(recipes_dir() / f"{name}.toml")


def parse_size(value: object, where: str) -> int:
    """``3G``, ``3GiB``, ``512M`` or a number of bytes -> bytes."""
    if isinstance(value, bool):
        raise ImageError(f"{where}: expected a size like '3G', got {value!r}")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE_RE.match(value)):
        size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    else:
        raise ImageError(f"{where}: expected a size like '3G', got {value!r}")
    if size <= 0:
        raise ImageError(f"{where}: size must be positive, got {value!r}")
    return size


class _Fields:
    """Typed access to a recipe table that remembers which keys were used."""

    def __init__(self, data: dict[str, Any], where: str) -> None:
        self.data = data
        self.where = where
        self.used: set[str] = set()

    def value(self, key: str) -> Any:
        self.used.add(key)
        return self.data.get(key)

    def string(self, key: str, default: str | None = None, choices: tuple[str, ...] = ()) -> str:
        value = self.value(key)
        if value is None:
            if default is None:
                raise ImageError(f"{self.where}: missing required key {key!r}")
            return default
        if not isinstance(value, str) or not value.strip():
            raise ImageError(f"{self.where}: {key!r} must be a non-empty string, got {value!r}")
        if choices and value not in choices:
            raise ImageError(
                f"{self.where}: {key!r} is {value!r}; expected one of {', '.join(choices)}"
            )
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.value(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ImageError(f"{self.where}: {key!r} must be true or false, got {value!r}")
        return value

    def strings(self, key: str, pattern: re.Pattern[str] | None = None) -> tuple[str, ...]:
        value = self.value(key)
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ImageError(f"{self.where}: {key!r} must be a list of strings, got {value!r}")
        for v in value:
            if any(c.isspace() for c in v) or (pattern is not None and not pattern.match(v)):
                raise ImageError(f"{self.where}: {key!r} has an invalid entry {v!r}")
        return tuple(value)

    def table(self, key: str) -> _Fields:
        value = self.value(key)
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ImageError(f"{self.where}: [{key}] must be a table, got {value!r}")
        return _Fields(value, f"{self.where} [{key}]")

    def check_unknown(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ImageError(
                f"{self.where}: unknown key(s) {', '.join(map(repr, unknown))}; "
                f"known: {', '.join(sorted(self.used))}"
            )


_PKG_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+(:[a-z0-9]+)?$")
_HOST_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def load_recipe_file(path: Path) -> Recipe:
    """Load and validate a recipe from any path; the name is the file's stem."""
    source, data = _read_recipe(path)
    where = f"recipe {path}"
    top = _Fields(data, where)
    suite = top.string("suite")
    description = top.string("description", "")
    architecture = top.string("architecture", "amd64", choices=ARCHITECTURES)
    components = top.strings("components") or ("main",)
    variant = top.string("variant", "apt", choices=_VARIANTS)
    packages = top.strings("packages", _PKG_RE)
    raw_size = top.value("disk_size")
    disk_size = parse_size("3G" if raw_size is None else raw_size, f"{where}: 'disk_size'")
    hostname = top.string("hostname", "debian")
    if not _HOST_RE.match(hostname):
        raise ImageError(f"{where}: 'hostname' {hostname!r} is not a valid host name")
    kernel_args = top.strings("kernel_args")
    network = top.string("network", "networkd", choices=_NETWORKS)
    check_valid_until = top.boolean("check_valid_until", True)
    if network == "ifupdown" and "net.ifnames=0" not in kernel_args:
        raise ImageError(
            f"{where}: network = 'ifupdown' configures eth0; add 'net.ifnames=0' to "
            "'kernel_args' so that the guest's interface has that name"
        )

    dpkg = top.table("dpkg")
    path_exclude = dpkg.strings("path_exclude")
    path_include = dpkg.strings("path_include")
    dpkg.check_unknown()

    modules, drivers, compress = _initramfs(top.table("initramfs"), where)

    units = top.table("units")
    enable = units.strings("enable", _UNIT_RE)
    disable = units.strings("disable", _UNIT_RE)
    mask = units.strings("mask", _UNIT_RE)
    units.check_unknown()
    top.check_unknown()

    _check_disk_size(disk_size, where)
    _check_architecture(architecture, variant, packages, where)

    return Recipe(
        name=path.stem,
        path=path.resolve(),
        suite=suite,
        description=description,
        architecture=architecture,
        components=components,
        variant=variant,
        packages=packages,
        disk_size=disk_size,
        hostname=hostname,
        kernel_args=kernel_args,
        network=network,
        check_valid_until=check_valid_until,
        dpkg_path_exclude=path_exclude,
        dpkg_path_include=path_include,
        initramfs_modules=modules,
        initramfs_drivers=drivers,
        initramfs_compress=compress,
        enable_units=enable,
        disable_units=disable,
        mask_units=mask,
        source=source,
    )


def _read_recipe(path: Path) -> tuple[bytes, dict[str, Any]]:
    """The recipe file's bytes (they feed :meth:`Recipe.digest`) and its TOML."""
    try:
        source = path.read_bytes()
    except OSError as exc:
        raise ImageError(f"cannot read recipe {path}: {exc.strerror or exc}") from exc
    try:
        data = tomllib.loads(source.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ImageError(f"recipe {path} is not valid TOML: {exc}") from exc
    return source, data


def _initramfs(initramfs: _Fields, where: str) -> tuple[str, tuple[str, ...], str]:
    """The ``[initramfs]`` table: modules, drivers and compress."""
    modules = initramfs.string("modules", "most", choices=_INITRAMFS_MODULES)
    drivers = initramfs.strings("drivers", re.compile(r"^[A-Za-z0-9_-]+$"))
    compress = initramfs.string("compress", "zstd", choices=_INITRAMFS_COMPRESS)
    initramfs.check_unknown()
    if modules == "list" and not drivers:
        raise ImageError(f"{where}: [initramfs] modules = 'list' needs a 'drivers' list")
    return modules, drivers, compress


def _check_architecture(
    architecture: str, variant: str, packages: tuple[str, ...], where: str
) -> None:
    """A kernel package of another architecture, or a variant the foreign builder
    cannot make, fails here rather than minutes into a build."""
    for package in packages:
        for other in ARCHITECTURES:
            if other != architecture and package.endswith(f"-{other}") and "linux-" in package:
                raise ImageError(
                    f"{where}: package {package!r} is for {other}, but 'architecture' is "
                    f"{architecture!r} (use {package[: -len(other)]}{architecture})"
                )
    if architecture != "amd64" and variant not in _FOREIGN_VARIANTS:
        raise ImageError(
            f"{where}: 'variant' {variant!r} cannot be built for {architecture}; "
            f"expected one of {', '.join(_FOREIGN_VARIANTS)}"
        )


def _check_disk_size(disk_size: int, where: str) -> None:
    minimum = 256 * _MIB
    if disk_size < minimum:
        raise ImageError(f"{where}: 'disk_size' must be at least 256M, got {disk_size} bytes")
    if disk_size % _MIB:
        raise ImageError(f"{where}: 'disk_size' must be a whole number of MiB")


# --- Downloaded images -----------------------------------------------------
#
# Official cloud images are not built: they are downloaded (by
# :mod:`pytest_kvm.images.download`). Their entries live in ``catalog/cloud/``,
# one TOML file per image with a ``[download]`` table, so that they never reach
# :func:`load_recipe` and their names stay apart from the local builds' names.

DOWNLOADS_SUBDIR = "cloud"
CHECKSUM_ALGORITHMS = ("sha256", "sha512")
_URL_RE = re.compile(r"^(https?|file)://\S+$")


@dataclass(frozen=True)
class DownloadEntry:
    """A catalog image that is downloaded: its URL and where its checksum is published."""

    name: str  # "ubuntu-24.04": the file name without .toml
    path: Path  # the .toml file
    url: str
    checksum_url: str  # a SHA256SUMS-like file: GNU, BSD or a lone hex digest
    checksum: str  # "sha256" | "sha512"
    format: str = "qcow2"  # what the downloaded file must be: "qcow2" | "raw"
    description: str = ""
    # The name the checksum file lists the image under (default: the URL's file name).
    checksum_name: str = ""
    # The OpenPGP key (a binary keyring file beside the entry) that signs the checksum
    # file, which is then PGP clear-signed and checked with gpgv; None when it is not.
    signing_key: Path | None = None


def downloads_dir() -> Path:
    return recipes_dir() / DOWNLOADS_SUBDIR


def download_names() -> list[str]:
    """Names of the catalog's downloaded images, sorted."""
    return _entry_names(downloads_dir())


def load_download(name: str) -> DownloadEntry:
    """Load and validate the downloaded catalog image ``name``."""
    known = download_names()
    if name not in known:
        listing = ", ".join(known) if known else f"none (no entries in {downloads_dir()})"
        raise ImageError(f"unknown downloaded catalog image {name!r}; known: {listing}")
    return load_download_file(downloads_dir() / f"{name}.toml")


def load_download_file(path: Path) -> DownloadEntry:
    """Load and validate a download entry from any path; the name is the file's stem."""
    try:
        data = tomllib.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise ImageError(f"cannot read catalog entry {path}: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ImageError(f"catalog entry {path} is not valid TOML: {exc}") from exc
    where = f"catalog entry {path}"
    top = _Fields(data, where)
    description = top.string("description", "")
    if top.data.get("download") is None:
        raise ImageError(f"{where}: missing the [download] table")
    dl = top.table("download")
    url = dl.string("url")
    checksum_url = dl.string("checksum_url")
    for key, value in (("url", url), ("checksum_url", checksum_url)):
        if not _URL_RE.match(value):
            raise ImageError(f"{where} [download]: {key!r} is not an http(s):// or file:// URL")
    checksum = dl.string("checksum", choices=CHECKSUM_ALGORITHMS)
    fmt = dl.string("format", "qcow2", choices=("qcow2", "raw"))
    checksum_name = dl.string("checksum_name", "")
    signing_key = _signing_key(dl.string("signing_key", ""), path, where)
    dl.check_unknown()
    top.check_unknown()
    return DownloadEntry(
        name=path.stem,
        path=path.resolve(),
        url=url,
        checksum_url=checksum_url,
        checksum=checksum,
        format=fmt,
        description=description,
        checksum_name=checksum_name,
        signing_key=signing_key,
    )


def _signing_key(name: str, entry: Path, where: str) -> Path | None:
    """The keyring file ``name`` (beside the entry) as a path; None for ""."""
    if not name:
        return None
    if "/" in name or name.startswith("."):
        raise ImageError(f"{where} [download]: 'signing_key' must name a file beside the entry")
    key = entry.resolve().parent / name
    if not key.is_file():
        raise ImageError(f"{where} [download]: the signing key {str(key)!r} does not exist")
    if key.read_bytes()[:5] == b"-----":
        raise ImageError(
            f"{where} [download]: the signing key {str(key)!r} is ASCII-armoured; gpgv needs "
            "it binary (gpg --dearmor < KEY.asc > KEY.gpg)"
        )
    return key
