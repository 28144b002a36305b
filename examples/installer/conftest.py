"""The installer example's set-up: the ``slow`` marker and the netboot installer files.

Slow tests are skipped unless ``--run-slow`` is given (the option exists when this
directory is on the command line) or ``PYTEST_KVM_SLOW=1`` is set, so a plain
``pytest tests/ examples/`` collects the installer test and skips it without
downloading or booting anything.

``netboot`` fetches Debian's netboot installer (the Debian package
``debian-installer-12-netboot-amd64``) with ``apt-get download`` from the archive in
this machine's apt sources, extracts it with ``dpkg-deb -x`` into
``<kvm cache>/netboot/<package>_<version>/`` under a file lock, and renames the
finished tree into place, so an interrupted fetch leaves nothing half-made behind.

``installer_mirror`` is the Debian archive the installer will use (see the README),
checked before anything boots: the netboot installer downloads the rest of itself
(partman, grub-installer, finish-install, ...: the "udebs" its initrd lacks) from
``dists/bookworm/main/debian-installer`` of that mirror, and a mirror or caching proxy
that serves ordinary packages but not those files makes the install stop minutes in.
"""

from __future__ import annotations

import gzip
import lzma
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from filelock import FileLock

from pytest_kvm.images.mirror import debian_mirror
from pytest_kvm.plugin import settings_key

NETBOOT_PACKAGE = "debian-installer-12-netboot-amd64"
SLOW_ENV = "PYTEST_KVM_SLOW"
MIRROR_ENV = "PYTEST_KVM_INSTALLER_MIRROR"
SUITE = "bookworm"
UDEB_INDEX = f"dists/{SUITE}/main/debian-installer/binary-amd64/Packages.xz"
# anna, the installer's component loader, installs every udeb of these priorities.
ANNA_PRIORITIES = ("required", "important", "standard")
HOW_TO_RUN = (
    "slow (a real Debian install, tens of minutes under TCG): run it with "
    "`pytest examples/installer --kvm-image debian-12 --run-slow` "
    f"or set {SLOW_ENV}=1"
)
HERE = Path(__file__).resolve().parent


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-slow",
        action="store_true",
        default=False,
        help="run tests marked slow (the Debian installer example: tens of minutes under TCG)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"slow: takes tens of minutes; skipped unless --run-slow or {SLOW_ENV}=1",
    )


def slow_enabled(config: pytest.Config) -> bool:
    if config.getoption("run_slow", default=False):
        return True
    return os.environ.get(SLOW_ENV, "").strip().lower() in ("1", "yes", "true", "on")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if slow_enabled(config):
        return
    skip = pytest.mark.skip(reason=HOW_TO_RUN)
    for item in items:
        # Conftest hooks see the whole session's items: only this directory's.
        if item.get_closest_marker("slow") is not None and item.path.is_relative_to(HERE):
            item.add_marker(skip)


@dataclass(frozen=True)
class Netboot:
    """The installer's kernel and initrd, and what fetching them cost."""

    version: str
    linux: Path
    initrd: Path
    fetch_seconds: float  # 0.0 when they came from the cache


def _run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False, timeout=600)


def _tail(text: str, lines: int = 8) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def candidate_version(package: str) -> str | None:
    """The version apt would download, or None when apt does not know the package."""
    if shutil.which("apt-cache") is None:
        return None
    result = _run(["apt-cache", "show", "--no-all-versions", package])
    for line in result.stdout.splitlines():
        if line.startswith("Version:"):
            return line.split(":", 1)[1].strip()
    return None


def _find(root: Path, relative: str) -> Path | None:
    found = sorted(p for p in root.rglob(relative) if p.is_file() and "/text/" in str(p))
    found = found or sorted(p for p in root.rglob(relative) if p.is_file())
    return found[0] if found else None


def _files(tree: Path) -> tuple[Path, Path] | None:
    linux = _find(tree, "debian-installer/amd64/linux")
    initrd = _find(tree, "debian-installer/amd64/initrd.gz")
    return (linux, initrd) if linux and initrd else None


def fetch_netboot(cache: Path, package: str = NETBOOT_PACKAGE) -> Netboot:
    """The netboot kernel and initrd of ``package``, downloaded once per version."""
    root = cache / "netboot"
    root.mkdir(parents=True, exist_ok=True)
    version = candidate_version(package)
    if version is None:
        # apt has no lists (or no such package): a cached copy still does.
        cached = sorted(p for p in root.glob(f"{package}_*") if p.is_dir())
        if cached and (files := _files(cached[-1])):
            return Netboot(cached[-1].name.split("_", 1)[1], *files, 0.0)
        raise RuntimeError(
            f"apt does not know the Debian package {package}: run `apt-get update` "
            "(on a Debian 12 host whose apt sources name a Debian archive with main)"
        )
    dest = root / f"{package}_{version.replace(':', '%3a')}"
    if dest.is_dir() and (files := _files(dest)):
        return Netboot(version, *files, 0.0)
    with FileLock(str(root / ".lock")):
        if dest.is_dir() and (files := _files(dest)):  # another process made it meanwhile
            return Netboot(version, *files, 0.0)
        started = time.monotonic()
        work = Path(tempfile.mkdtemp(prefix=".fetch-", dir=root))
        try:
            got = _run(["apt-get", "download", f"{package}={version}"], cwd=work)
            debs = sorted(work.glob("*.deb"))
            if got.returncode != 0 or not debs:
                raise RuntimeError(
                    f"`apt-get download {package}={version}` failed (exit {got.returncode}); "
                    f"is the Debian archive in this machine's apt sources reachable? Try "
                    f"`apt-get update`.\n{_tail(got.stderr or got.stdout)}"
                )
            tree = work / "tree"
            unpacked = _run(["dpkg-deb", "-x", str(debs[0]), str(tree)])
            if unpacked.returncode != 0:
                raise RuntimeError(
                    f"`dpkg-deb -x {debs[0].name}` failed (exit {unpacked.returncode}):\n"
                    f"{_tail(unpacked.stderr)}"
                )
            if _files(tree) is None:
                raise RuntimeError(
                    f"{debs[0].name} has no debian-installer/amd64/linux and initrd.gz"
                )
            if dest.exists():  # a broken earlier copy
                shutil.rmtree(dest)
            os.replace(tree, dest)  # whole or not at all
        finally:
            shutil.rmtree(work, ignore_errors=True)
        files = _files(dest)
        assert files is not None
        return Netboot(version, *files, time.monotonic() - started)


@pytest.fixture(scope="session")
def netboot(pytestconfig: pytest.Config) -> Netboot:
    """Debian 12's netboot installer kernel and initrd (cached under the kvm cache)."""
    cache = pytestconfig.stash[settings_key].cache
    try:
        return fetch_netboot(cache)
    except RuntimeError as exc:
        pytest.fail(f"cannot get the Debian netboot installer: {exc}", pytrace=False)


def _cpio_newc(data: bytes) -> dict[str, bytes]:
    """Regular files of a newc cpio archive (an initramfs), by path."""
    files: dict[str, bytes] = {}
    pos = 0
    while pos + 110 <= len(data) and data[pos : pos + 5] == b"07070":
        namesize = int(data[pos + 94 : pos + 102], 16)
        filesize = int(data[pos + 54 : pos + 62], 16)
        name = data[pos + 110 : pos + 110 + namesize - 1].decode(errors="replace")
        start = (pos + 110 + namesize + 3) & ~3
        if name == "TRAILER!!!":
            break
        files[name.removeprefix("./")] = data[start : start + filesize]
        pos = (start + filesize + 3) & ~3
    return files


def _stanzas(text: str) -> list[dict[str, str]]:
    return [dict(re.findall(r"^([\w-]+): (.*)$", s, re.M)) for s in text.split("\n\n")]


def initrd_contents(initrd: Path) -> tuple[set[str], str]:
    """The udebs already in the netboot initrd, and the kernel version it is for."""
    files = _cpio_newc(gzip.decompress(initrd.read_bytes()))
    status = files.get("var/lib/dpkg/status", b"").decode(errors="replace")
    packages = {s["Package"] for s in _stanzas(status) if "Package" in s}
    kernels = {m.group(1) for n in files if (m := re.match(r"lib/modules/([^/]+)/", n))}
    return packages, min(kernels, default="")


def _get(url: str, first_byte_only: bool = False) -> bytes:
    request = urllib.request.Request(url, headers={"Range": "bytes=0-0"} if first_byte_only else {})
    with urllib.request.urlopen(request, timeout=60) as answer:
        return bytes(answer.read())


def missing_installer_files(mirror: str, netboot: Netboot) -> list[str]:
    """The udebs the installer will download from ``mirror`` that it does not serve.

    A mirror that cannot be reached from here at all is not judged (the guest may
    see it differently): the install then tells for itself."""
    try:
        index = lzma.decompress(_get(f"{mirror}/{UDEB_INDEX}")).decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return [f"{UDEB_INDEX} (HTTP {exc.code})"]
    except (urllib.error.URLError, OSError, lzma.LZMAError):
        return []
    have, kernel = initrd_contents(netboot.initrd)
    missing = []
    for stanza in _stanzas(index):
        wanted = (
            stanza.get("Priority") in ANNA_PRIORITIES
            and stanza.get("Kernel-Version", kernel) == kernel
            and stanza.get("Package") not in have
            and "Filename" in stanza
        )
        if not wanted:
            continue
        try:
            _get(f"{mirror}/{stanza['Filename']}", first_byte_only=True)
        except urllib.error.HTTPError as exc:
            missing.append(f"{stanza['Filename']} (HTTP {exc.code})")
        except (urllib.error.URLError, OSError):
            return []
    return missing


@pytest.fixture(scope="session")
def installer_mirror(netboot: Netboot) -> str:
    """The Debian archive URL the installer uses (as this host sees it), checked to
    serve the installer's own components: a clear failure now rather than a stuck
    install in ten minutes."""
    url = os.environ.get(MIRROR_ENV, "").strip() or debian_mirror()
    url = url.rstrip("/")
    missing = missing_installer_files(url, netboot)
    if missing:
        shown = "\n  ".join(missing[:12]) + ("\n  ..." if len(missing) > 12 else "")
        pytest.fail(
            f"the mirror {url} does not serve {len(missing)} of the installer components "
            f"that the netboot initrd downloads (dists/{SUITE}/main/debian-installer), "
            f"so the install cannot finish; point {MIRROR_ENV} at a full Debian mirror. "
            f"Missing:\n  {shown}",
            pytrace=False,
        )
    return url
