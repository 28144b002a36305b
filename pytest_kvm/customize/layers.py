"""Customisation layers: a cached qcow2 layer over an image with a customisation
applied, keyed by the base image and the customisation's content, so the same
customisation is built once; and the one-time libguestfs look at whether an image runs
cloud-init (its answer kept with the image facts, see images/facts.py)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from filelock import FileLock

from ..errors import ImageError
from ..images import Image
from ..images.facts import facts_path, read_facts, write_facts
from ..images.overlay import create_overlay, image_info
from ..util import rename_synced
from .handle import DiskHandle
from .source import DiskSource
from .spec import Customization

# Bump when what a layer holds for the same input changes, so old layers are not used.
CUSTOMIZE_FORMAT = 1


def layer_key(image: Image, custom: Customization) -> str:
    payload = json.dumps(
        {"format": CUSTOMIZE_FORMAT, "image": image.identity(), "custom": custom.digest()},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def customized_image(
    image: Image,
    custom: Customization,
    cache: Path,
    force_tcg: bool,
    progress: Callable[[str], None] = print,
) -> Image:
    """``image`` with ``custom`` applied: a cached qcow2 layer over it, built once
    (under a file lock, so parallel workers build it once too)."""
    key = layer_key(image, custom)
    encrypted = (True, *image.encrypted) if image.is_encrypted else ()
    path = cache / "layers" / f"{image.name}-{key}.qcow2"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            progress(f"pytest-kvm: customising {image.name} ({custom.summary()}) into {path}")
            t0 = time.monotonic()
            work = path.with_name(f".{path.name}.building-{os.getpid()}")
            try:
                create_overlay(image.path, image.format, work, size=image.virtual_size,
                               secret=image.secret if image.is_encrypted else None)  # fmt: skip
                source = DiskSource(work, "qcow2", encrypted, image.secret)
                with DiskHandle(source, readonly=False, force_tcg=force_tcg,
                                what=f"the customisation of {image.name}") as disk:  # fmt: skip
                    disk.apply(custom)
                rename_synced(work, path)
            finally:
                work.unlink(missing_ok=True)
            progress(f"pytest-kvm: customised {image.name} in {time.monotonic() - t0:.1f} s")
    return replace(
        image,
        name=f"{image.name}+{key[:8]}",
        path=path,
        format="qcow2",
        encrypted=encrypted,
    )


def prune_layers(cache: Path) -> list[Path]:
    """Remove layers whose base image is gone (their backing file no longer exists)."""
    removed = []
    for path in sorted((cache / "layers").glob("*.qcow2")):
        try:
            backing = str(image_info(path).get("full-backing-filename") or "")
        except ImageError:
            backing = ""
        if backing and not Path(backing).exists():
            path.unlink(missing_ok=True)
            Path(str(path) + ".lock").unlink(missing_ok=True)
            removed.append(path)
    return removed


def probe_cloud_init(image: Image, cache: Path, force_tcg: bool) -> bool:
    """Whether ``image`` runs cloud-init at boot. A catalog build says so next to
    the image; any other image is looked at once with libguestfs and the answer is
    kept in ``<cache>/layers/``, keyed by the image file's identity."""
    known = read_facts(image.path, facts_path(image.path))
    if known is not None:
        return known
    key = hashlib.sha256(str(image.path.resolve()).encode()).hexdigest()[:16]
    record = cache / "layers" / f"facts-{image.name}-{key}.json"
    known = read_facts(image.path, record)
    if known is not None:
        return known
    with DiskHandle(DiskSource.of(image), readonly=True, force_tcg=force_tcg,
                    what=f"image {image.name}") as disk:  # fmt: skip
        g = disk.g
        has = any(g.is_file(p) for p in ("/usr/bin/cloud-init", "/bin/cloud-init")) and not (
            g.exists("/etc/cloud/cloud-init.disabled")
        )
    record.parent.mkdir(parents=True, exist_ok=True)
    write_facts(image.path, has, record)
    return has
