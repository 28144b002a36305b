"""Turn what the user gave ``--kvm-image`` into a validated Image: a path or a catalog name.

Catalog images are built on first use into the cache, under a file lock, so that
several pytest processes asking at once build once and share the result.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from ..errors import ImageError, KvmConfigError
from . import Image
from .facts import facts_path, write_facts
from .overlay import (
    check_secret,
    encrypted_chain,
    image_info,
    key_secret_opts,
    qemu_img,
    secret_object,
)

_NAME = re.compile(r"^[a-z][a-z0-9.+-]*$")
_URL = re.compile(r"^(https?|file)://", re.IGNORECASE)
_ANY_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def classify(spec: str) -> str:
    """ "url", "path" or "catalog": how a ``--kvm-image`` value will be resolved."""
    if _URL.match(spec):
        return "url"
    if "/" in spec or Path(spec).suffix in (".qcow2", ".img", ".raw") or Path(spec).exists():
        return "path"
    return "catalog"


def check_spec(spec: str) -> None:
    """Fast checks at start-up; a KvmConfigError names the value and the problem."""
    kind = classify(spec)
    other_url = _ANY_URL.match(spec)
    if kind != "url" and other_url:
        raise KvmConfigError(
            f"image {spec!r}: URL scheme {other_url.group(1)!r} is not supported; "
            "give a path or a catalog name"
        )
    if kind == "url":
        from .download import check_url

        check_url(spec)
        return
    if kind == "path":
        validate_path(Path(spec).expanduser(), spec)
        return
    if not _NAME.match(spec):
        raise KvmConfigError(f"image {spec!r}: not a path, URL or catalog name")
    from .recipe import catalog_names, download_names

    if spec not in catalog_names() and spec not in download_names():
        raise KvmConfigError(
            f"image {spec!r}: unknown catalog image; known: {', '.join(catalog_names())}"
            + (f"; downloaded: {', '.join(download_names())}" if download_names() else "")
        )


def validate_path(path: Path, given: str) -> tuple[str, int]:
    """Format and virtual size of a usable base image, else an ImageError saying why."""
    if not path.exists():
        raise ImageError(f"image {given!r} does not exist")
    if not path.is_file():
        raise ImageError(f"image {given!r} is not a regular file")
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ImageError(f"image {given!r} cannot be opened: {exc.strerror}") from None
    try:
        info = image_info(path)
    except ImageError as exc:
        raise ImageError(f"image {given!r} is not a usable disk image: {exc}") from None
    fmt = str(info.get("format", ""))
    size = int(info.get("virtual-size", 0))
    if fmt == "qcow2" and info.get("encrypted"):
        return fmt, size  # checked with its key, by check_encryption
    if fmt == "qcow2":
        proc = qemu_img("check", "-U", "--output=json", "--", str(path), timeout=300)
        report = _json_or_empty(proc.stdout)
        errors = _count(report, "corruptions") + _count(report, "check-errors")
        if proc.returncode not in (0, 3) or errors:
            raise ImageError(
                f"image {given!r} is a damaged qcow2 (truncated or corrupt): "
                f"qemu-img check found {errors or 'errors'}"
                + (f" ({proc.stderr.strip().splitlines()[-1]})" if proc.stderr.strip() else "")
            )
        return fmt, size
    if fmt == "raw":
        with path.open("rb") as disk:
            head = disk.read(512)
        if size < 1024 * 1024 or len(head) < 512 or head[510:512] != b"\x55\xaa":
            raise ImageError(
                f"image {given!r} is not a disk image: no qcow2 header and no partition "
                "table (expected qcow2, or a raw disk with an MBR/GPT)"
            )
        return fmt, size
    raise ImageError(f"image {given!r} has format {fmt!r}; pytest-kvm accepts qcow2 and raw")


def _count(report: dict[str, object], key: str) -> int:
    value = report.get(key, 0)
    return value if isinstance(value, int) else 0


def _json_or_empty(text: str) -> dict[str, object]:
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def image_name(spec: str) -> str:
    """The readable name test ids carry for an image value."""
    if classify(spec) == "catalog":
        return spec
    if classify(spec) == "url":
        from .download import url_stem

        return url_stem(spec)
    stem = Path(spec.split("#", 1)[0].rstrip("/")).name
    for suffix in (".qcow2", ".img", ".raw"):
        stem = stem.removesuffix(suffix)
    return stem or spec


def check_encryption(path: Path, given: str, secret: Path | None) -> tuple[bool, ...]:
    """Which layers of the image are LUKS-encrypted (top first); an ImageError if it
    is encrypted and ``secret`` is missing or does not unlock it. Checked once per
    image file and key in a process (each check costs a key derivation)."""
    st = path.stat()
    memo = (str(path.resolve()), st.st_ino, st.st_mtime_ns, str(secret))
    if memo not in _checked:
        _checked[memo] = _check_encryption(path, given, secret)
    return _checked[memo]


_checked: dict[tuple[str, int, int, str], tuple[bool, ...]] = {}


def _check_encryption(path: Path, given: str, secret: Path | None) -> tuple[bool, ...]:
    encrypted = encrypted_chain(path)
    if not encrypted:
        return ()
    if secret is None:
        raise ImageError(
            f"image {given!r} is encrypted (qcow2 LUKS): give the file holding its secret "
            "with --kvm-image-secret FILE"
        )
    problem = check_secret(path, encrypted, secret)
    if problem:
        raise ImageError(
            f"image {given!r}: the secret in {str(secret)!r} does not unlock it ({problem})"
        )
    proc = qemu_img(
        "check", "-U", "--output=json", "--object", secret_object(secret), "--image-opts",
        f"driver=qcow2,file.filename={path},{key_secret_opts(encrypted)}", timeout=300,
    )  # fmt: skip
    report = _json_or_empty(proc.stdout)
    errors = _count(report, "corruptions") + _count(report, "check-errors")
    if proc.returncode not in (0, 3) or errors:
        raise ImageError(f"image {given!r} is a damaged qcow2: {proc.stderr.strip()[-200:]}")
    return encrypted


def resolve(
    spec: str,
    cache: Path,
    progress: Callable[[str], None] = print,
    secret: Path | None = None,
    offline: bool = False,
    probe_cloud_init: Callable[[Image], bool] | None = None,
) -> Image:
    """The Image for ``spec``, building a catalog image into ``cache`` if needed, or
    downloading a URL or a downloaded catalog image (not when ``offline``).

    ``probe_cloud_init`` says whether an image given by path runs cloud-init (the
    caller's libguestfs look); without it such an image is assumed to."""
    kind = classify(spec)
    if kind == "path":
        path = Path(spec).expanduser().resolve()
        fmt, size = validate_path(path, spec)
        encrypted = check_encryption(path, spec, secret) if fmt == "qcow2" else ()
        image = Image(
            image_name(spec), path, fmt, spec, size,
            encrypted=encrypted, secret=secret if encrypted else None,
        )  # fmt: skip
        if probe_cloud_init is None:
            return image
        return dataclasses.replace(image, cloud_init=probe_cloud_init(image))
    check_spec(spec)
    if kind == "url" or is_downloaded(spec):
        return fetch_image(spec, cache, progress, offline)
    return build_cached(spec, cache, progress)


def is_downloaded(name: str) -> bool:
    """Whether catalog name ``name`` is downloaded (``catalog/cloud/``), not built."""
    from .recipe import catalog_names, download_names

    return name in download_names() and name not in catalog_names()


def fetch_image(
    spec: str, cache: Path, progress: Callable[[str], None] = print, offline: bool = False
) -> Image:
    """A URL or downloaded catalog image: fetched once into the cache, checksummed,
    then validated like a path. A file that is not a usable image is dropped from the
    cache, so that the next run fetches it again."""
    from .download import catalog_source, fetch, forget, parse_url

    source = parse_url(spec) if classify(spec) == "url" else catalog_source(spec)
    path = fetch(source, cache, progress, offline)
    try:
        fmt, size = validate_path(path, spec)
        if source.format and fmt != source.format:
            raise ImageError(f"image {spec!r} is {fmt}, but its catalog entry says {source.format}")
    except ImageError:
        forget(path)
        raise
    return Image(image_name(spec), path, fmt, spec, size)


def catalog_path(name: str, cache: Path) -> Path:
    from .recipe import load_recipe

    recipe = load_recipe(name)
    return cache / "images" / f"{name}-{recipe.digest()[:12]}.qcow2"


def build_cached(name: str, cache: Path, progress: Callable[[str], None] = print) -> Image:
    """The cached build of catalog image ``name``; builds it once across processes."""
    from .builder import build_image
    from .recipe import load_recipe

    recipe = load_recipe(name)
    path = catalog_path(name, cache)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            progress(f"pytest-kvm: building image {name} into {path} (first use)")
            build_image(recipe, path, progress=progress)
        if not facts_path(path).exists():
            write_facts(path, cloud_init="cloud-init" in recipe.packages)
    fmt, size = validate_path(path, name)
    return Image(name, path, fmt, name, size)
