"""Which architecture an image is, found without booting it, and remembered.

A catalog image is what its recipe's ``architecture`` says. Any other image (a path,
a URL, a downloaded cloud image) is looked at once: the removable-media boot file on
its EFI system partition (``\\EFI\\BOOT\\BOOT*.EFI``, read with ``qemu-img dd`` through
backing files and mtools, no mount, no libguestfs), whose PE header names the machine
it runs on. An image without one (a BIOS-only disk) is of no known architecture:
``None``, which a guest takes as x86_64, what pytest-kvm always ran, unless
``--kvm-arch`` says otherwise.

The answer is kept in ``<cache>/facts/arch-<hash of the path>.json`` with the file's
identity (size, mtime, inode), like :mod:`pytest_kvm.images.facts`, and is valid
while that identity is unchanged.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

from . import arch as arches
from .images import Image
from .images.efi import SECTOR, find_esp, read_sectors

_MAX_ESP = 2 << 30  # an ESP bigger than this is not read (it would be copied)
_MTOOLS_ENV = {"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"}
_PE_MACHINES = {a.pe_machine: a.name for a in arches.ARCHES.values()}


def image_arch(image: Image, cache: Path | None = None) -> tuple[str | None, str]:
    """The architecture of ``image`` (a ``uname -m`` name, or None when it cannot be
    told) and how that was found, in a few words for error messages."""
    recipe = _recipe_arch(image.source)
    if recipe is not None:
        return recipe, f"its catalog recipe says {recipe}"
    if image.is_encrypted:
        return None, "an encrypted image cannot be looked at"
    found = _cached(image.path, image.format, cache)
    if found is None:
        return None, "no \\EFI\\BOOT\\BOOT*.EFI on an EFI system partition"
    return found, f"its \\EFI\\BOOT boot file is {found}"


def catalog_arch_refusal(spec: str, asked: str, where: str) -> str:
    """ "" unless ``spec`` is a catalog image of another architecture than ``asked``
    (checked at start-up: no build, no boot); then the one-line error, naming
    ``where`` the ask came from."""
    found = _recipe_arch(spec)
    if asked == arches.AUTO or found is None or found == asked:
        return ""
    return (
        f"{where}: architecture {asked!r}, but image {spec!r} is {found} "
        f"(its catalog recipe says {found})"
    )


def _recipe_arch(source: str) -> str | None:
    from .images.recipe import catalog_names, load_recipe
    from .images.store import classify

    if classify(source) != "catalog" or source not in catalog_names():
        return None
    return arches.canonical(load_recipe(source).architecture)


def _record_path(cache: Path, path: Path) -> Path:
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    return cache / "facts" / f"arch-{digest}.json"


def _identity(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def _cached(path: Path, fmt: str, cache: Path | None) -> str | None:
    identity = _identity(path)
    record = _record_path(cache, path) if cache is not None else None
    if record is not None:
        try:
            doc = json.loads(record.read_text())
            if doc["file"] == identity:
                return doc["arch"] if isinstance(doc["arch"], str) else None
        except (OSError, ValueError, KeyError, TypeError):
            pass
    found = esp_arch(path, fmt)
    if record is not None:
        record.parent.mkdir(parents=True, exist_ok=True)
        tmp = record.with_name(f".{record.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"file": identity, "arch": found}) + "\n")
        os.replace(tmp, record)
    return found


def esp_arch(path: Path, fmt: str) -> str | None:
    """The architecture of the boot file(s) in ``\\EFI\\BOOT`` on the image's ESP, or
    None (no GPT, no ESP, no boot file, or boot files of several architectures)."""
    st = path.stat()
    return _esp_arch(str(path), fmt, st.st_size, st.st_mtime_ns, st.st_ino)


@functools.lru_cache(maxsize=64)
def _esp_arch(path: str, fmt: str, size: int, mtime: int, inode: int) -> str | None:
    del size, mtime, inode  # the cache key: the file's identity
    qemu_img, mcopy = shutil.which("qemu-img"), shutil.which("mcopy")
    if qemu_img is None or mcopy is None:
        return None
    with tempfile.TemporaryDirectory(prefix="pytest-kvm-arch-") as tmp:
        work = Path(tmp)
        head = read_sectors(qemu_img, path, fmt, work / "head", 0, 34)
        esp = find_esp(head)
        if esp is None:
            return None
        first, last = esp
        if (last - first + 1) * SECTOR > _MAX_ESP:
            return None
        read_sectors(qemu_img, path, fmt, work / "esp", first, last - first + 1)
        found = set()
        for spec in arches.ARCHES.values():
            boot = work / spec.efi_boot
            copied = subprocess.run(
                [mcopy, "-n", "-i", str(work / "esp"), f"::/EFI/BOOT/{spec.efi_boot}", str(boot)],
                capture_output=True,
                env=_MTOOLS_ENV,
            )
            if copied.returncode == 0 and boot.is_file():
                machine = pe_machine(boot.read_bytes()[:4096])
                if machine in _PE_MACHINES:
                    found.add(_PE_MACHINES[machine])
    return found.pop() if len(found) == 1 else None


def pe_machine(data: bytes) -> int | None:
    """The COFF machine field of a PE image (``IMAGE_FILE_MACHINE_*``), or None."""
    if len(data) < 0x40 or data[:2] != b"MZ":
        return None
    (pe,) = struct.unpack_from("<I", data, 0x3C)
    if len(data) < pe + 6 or data[pe : pe + 4] != b"PE\0\0":
        return None
    (machine,) = struct.unpack_from("<H", data, pe + 4)
    return int(machine)
