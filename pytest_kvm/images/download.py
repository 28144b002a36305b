"""Images fetched by URL: resumable download, checksum, cache, lock and progress.

A source is a URL (``https://host/x.qcow2#sha256=HEX``, ``file:///srv/x.qcow2``)
or a downloaded catalog entry (``catalog/cloud/NAME.toml``: URL plus the URL of a
checksum file). Layout under the cache::

    downloads/<key>/<version>/<file>       a verified image, used read-only
    downloads/<key>/<version>/<file>.json  what was verified: URL, algorithm, digest,
                                           size and mtime of <file>
    downloads/<key>/<version>/.use         held shared by every process using it
    downloads/<key>/current.json           the version <key> resolves to: the newest
    downloads/<key>/<file>.part            a download in progress (resumed with Range)
    downloads/<key>/<file>.part.json       the ETag / Last-Modified the part came from
    downloads/<key>/.lock                  one downloader per key across processes

``<key>`` is the catalog name, or the URL's image name plus a hash of the URL;
``<version>`` is the algorithm and the first 32 hex digits of the file's digest
(``sha256-0f3a...``). The file is renamed into place (and synced) only after its
checksum matched; a mismatch deletes the part and raises :class:`ImageError` naming
both digests. A version is never replaced: overlays, templates and layers are
backed by its path. A new one is downloaded beside it and becomes current;
:func:`prune` (``pytest-kvm template prune``) removes superseded versions that no
live process uses.

Checksum policy: a ``#sha256=``/``#sha512=`` fragment pins the digest, so a
cached copy is used without any request. A catalog entry's checksum file is
fetched on every resolve when online (it is small): if it lists another digest
than the cached copy's, upstream has a new image and it is downloaded again; if
it cannot be fetched, the cached copy is used with a warning. Offline
(``--kvm-offline``) a cached copy is used as recorded (size and mtime checked,
not re-hashed) and anything else is an error. A URL without a checksum is
downloaded once, cached by URL, and reported as not verified.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from ..errors import ImageError
from ..uselock import hold, release, unused
from ..util import fsync_path, rename_synced

# Re-exported: what other modules and tests import from here.
from .checksums import GPGV_TIMEOUT as GPGV_TIMEOUT
from .checksums import fetch_checksum as fetch_checksum
from .checksums import is_clearsigned as is_clearsigned
from .checksums import parse_checksums as parse_checksums
from .checksums import verified_text as verified_text
from .fetching import NoDowngrade as NoDowngrade
from .fetching import copy_file, http_download, part_meta, read_json, write_json
from .source import DIGEST_LENGTHS as DIGEST_LENGTHS
from .source import Source as Source
from .source import catalog_source as catalog_source
from .source import check_url as check_url
from .source import file_path as file_path
from .source import parse_url as parse_url
from .source import url_stem as url_stem

Progress = Callable[[str], None]

# --- the cache -----------------------------------------------------------------

#: Which version a source resolves to, in its cache directory.
CURRENT = "current.json"
#: The lock file, in a version's directory, that every process using it holds shared.
USE_LOCK = ".use"
_VERSION = re.compile(r"^(sha256|sha512)-[0-9a-f]{32}$")


def cache_dir(source: Source, cache: Path) -> Path:
    return cache / "downloads" / source.key


def version_name(algorithm: str, digest: str) -> str:
    """The directory of the version with this digest: never reused for other bytes."""
    return f"{algorithm}-{digest[:32]}"


def cached(source: Source, cache: Path) -> Path | None:
    """The cached, verified copy of ``source`` that it resolves to, or None. Cheap: no
    hashing, no lock."""
    return _current(source, cache_dir(source, cache))


def _current(source: Source, directory: Path) -> Path | None:
    target = current_file(directory, source.filename)
    return target if target is not None and _record(source, target) is not None else None


def current_file(directory: Path, filename: str | None = None) -> Path | None:
    """The file of the version ``directory``'s pointer names (None: none, or it is gone)."""
    pointer = read_json(directory / CURRENT) or {}
    version, name = pointer.get("version"), pointer.get("file")
    if not isinstance(version, str) or not _VERSION.match(version) or not isinstance(name, str):
        return None
    if filename is not None and name != filename:
        return None
    target = directory / version / name
    return target if target.is_file() else None


def _set_current(directory: Path, target: Path) -> None:
    write_json(directory / CURRENT, {"version": target.parent.name, "file": target.name})


def _record(source: Source, target: Path) -> dict[str, Any] | None:
    """What was recorded when ``target`` was verified, if it still describes it."""
    record = read_json(_record_path(target))
    if record is None or record.get("url") != source.url:
        return None
    try:
        st = target.stat()
    except OSError:
        return None
    if (record.get("size"), record.get("mtime_ns")) != (st.st_size, st.st_mtime_ns):
        return None
    if source.digest and (record.get("algorithm"), record.get("digest")) != (
        source.algorithm,
        source.digest,
    ):
        return None
    if source.is_file and not source.digest:
        try:
            src = file_path(source.url).stat()
        except OSError:
            return record  # the original is gone: the copy is what there is
        if record.get("source") != [src.st_size, src.st_mtime_ns]:
            return None
    return record


def _record_path(target: Path) -> Path:
    return target.with_name(target.name + ".json")


def forget(path: Path) -> None:
    """Drop a cached download (say, it turned out not to be a usable image): nothing
    can be backed by it, since it was never handed out as an image."""
    release(path.parent / USE_LOCK)
    directory = path.parent.parent
    if current_file(directory) == path:
        (directory / CURRENT).unlink(missing_ok=True)
    shutil.rmtree(path.parent, ignore_errors=True)


@contextmanager
def _locked(directory: Path, label: str, progress: Progress) -> Iterator[None]:
    lock = FileLock(str(directory / ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        progress(f"pytest-kvm: waiting for another process downloading {label}")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def fetch(source: Source, cache: Path, progress: Progress = print, offline: bool = False) -> Path:
    """The verified local copy of ``source``, downloading it once across processes.

    Every version lives at a path of its own (its digest names its directory) and is
    never replaced, so overlays, templates and layers made from an older version keep
    reading its bytes; this process holds it in use (see :func:`prune`) until it ends."""
    directory = cache_dir(source, cache)
    directory.mkdir(parents=True, exist_ok=True)
    with _locked(directory, source.label, progress):
        target = _resolve(source, directory, progress, offline)
        # Under the download lock, which prune takes before it removes a version.
        hold(target.parent / USE_LOCK)
        return target


def _resolve(source: Source, directory: Path, progress: Progress, offline: bool) -> Path:
    current = _current(source, directory)
    if offline and not source.is_file:
        if current is not None:
            return current
        raise ImageError(
            f"image {source.label!r} ({source.url}) is not in the cache "
            f"({directory}) and --kvm-offline forbids downloading it"
        )
    algorithm, expected = source.algorithm, source.digest
    if not expected and source.checksum_url:
        try:
            expected = fetch_checksum(source)
        except ImageError as exc:
            record = _record(source, current) if current is not None else None
            if current is None or record is None:
                raise
            progress(f"pytest-kvm: {exc}; using the cached copy verified {record['when']}")
            return current
    if expected:
        known = directory / version_name(algorithm, expected) / source.filename
        record = _record(source, known)
        if record is not None and (record["algorithm"], record["digest"]) == (algorithm, expected):
            _set_current(directory, known)
            return known
        if current is not None:
            progress(
                f"pytest-kvm: {source.label}: the published {algorithm} changed; "
                "downloading the new image (the cached one stays for what uses it)"
            )
    elif current is not None:
        return current
    target = _download(source, directory, algorithm or "sha256", expected, progress)
    _set_current(directory, target)
    return target


def _download(
    source: Source, directory: Path, algorithm: str, expected: str, progress: Progress
) -> Path:
    part = directory / (source.filename + ".part")
    if source.is_file:
        actual = copy_file(source, part, algorithm, progress)
        origin = file_path(source.url).stat()
        source_stat: list[int] | None = [origin.st_size, origin.st_mtime_ns]
    else:
        actual = http_download(source, part, algorithm, progress)
        source_stat = None
    if expected and actual != expected:
        part.unlink(missing_ok=True)
        part_meta(part).unlink(missing_ok=True)
        raise ImageError(
            f"image {source.label!r}: checksum mismatch for {source.url}: expected "
            f"{algorithm} {expected}, got {actual}; the download was deleted"
        )
    if not expected:
        progress(
            f"pytest-kvm: {source.label}: no checksum given, so the download is not verified "
            f"(pin it with #{algorithm}={actual})"
        )
    version = directory / version_name(algorithm, actual)
    version.mkdir(exist_ok=True)
    fsync_path(directory)
    target = version / source.filename
    # The path names the digest: a file already there has these very bytes.
    rename_synced(part, target)
    part_meta(part).unlink(missing_ok=True)
    st = target.stat()
    write_json(
        _record_path(target),
        {
            "url": source.url,
            "checksum_url": source.checksum_url,
            "algorithm": algorithm,
            "digest": actual,
            "verified": bool(expected),
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "source": source_stat,
            "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
    )
    return target


def prune(cache: Path) -> tuple[list[Path], list[Path]]:
    """Remove downloaded versions that a newer one superseded and that no live
    process uses; (removed, left because in use). What was made from a removed
    version (templates, layers) is stale then, and pruned after it."""
    removed: list[Path] = []
    in_use: list[Path] = []
    root = cache / "downloads"
    for directory in sorted(root.iterdir()) if root.is_dir() else []:
        if not directory.is_dir():
            continue
        lock = FileLock(str(directory / ".lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            continue  # being downloaded or resolved right now
        try:
            current = current_file(directory)
            for version in sorted(directory.iterdir()):
                if not version.is_dir() or not _VERSION.match(version.name):
                    continue
                if current is not None and version == current.parent:
                    continue
                with unused(version / USE_LOCK) as free:
                    if free:
                        shutil.rmtree(version, ignore_errors=True)
                        removed.append(version)
                    else:
                        in_use.append(version)
        finally:
            lock.release()
    return removed, in_use


def remove(source: Source, cache: Path) -> None:
    """Delete everything cached for ``source``."""
    shutil.rmtree(cache_dir(source, cache), ignore_errors=True)
