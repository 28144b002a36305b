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

import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from ..errors import ImageError, KvmConfigError
from ..uselock import hold, release, unused
from ..util import fsync_path, rename_synced

DIGEST_LENGTHS = {"sha256": 64, "sha512": 128}
CHUNK = 256 * 1024
#: Seconds between two progress lines of one download.
PROGRESS_INTERVAL = 2.0
#: Tries of one download within a resolve; each resumes where the last stopped.
ATTEMPTS = 4
#: Seconds before the second try; doubled for each later one.
RETRY_DELAY = 1.0
#: Socket timeout of each request, in seconds.
TIMEOUT = 60.0
_MIB = 1024 * 1024
_FRAGMENT = re.compile(r"^(sha256|sha512)=([0-9a-fA-F]+)$")
_SAFE = re.compile(r"[^A-Za-z0-9._+-]")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Source:
    """Where an image comes from and how it is checked."""

    url: str  # without the fragment
    key: str  # the cache directory's name
    label: str  # what progress lines and errors call it
    algorithm: str = ""  # "sha256" | "sha512" | "" (unknown until the checksum file)
    digest: str = ""  # pinned by the URL's fragment (lower case)
    checksum_url: str = ""  # catalog entries: where the digest is published
    checksum_name: str = ""  # the name the checksum file lists
    format: str = ""  # what the catalog entry says the file is
    signing_key: Path | None = None  # the keyring that signs the checksum file

    @property
    def filename(self) -> str:
        return _file_name(self.url)

    @property
    def is_file(self) -> bool:
        return self.url.lower().startswith("file://")


def _file_name(url: str) -> str:
    name = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1])
    name = _SAFE.sub("_", name).lstrip(".")[:120]
    return name or "image"


def url_stem(url: str) -> str:
    """The readable name of a URL's image: its file name without the disk suffix."""
    stem = _file_name(url.split("#", 1)[0])
    for suffix in (".qcow2", ".img", ".raw"):
        stem = stem.removesuffix(suffix)
    return stem or "image"


def parse_url(spec: str) -> Source:
    """The Source of a URL ``--kvm-image`` value; KvmConfigError if it is malformed."""
    url, _, fragment = spec.partition("#")
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https", "file"):
        raise KvmConfigError(f"image {spec!r}: URL scheme {parts.scheme!r} is not supported")
    if scheme != "file" and not parts.hostname:
        raise KvmConfigError(f"image {spec!r}: the URL has no host")
    if not parts.path.rstrip("/"):
        raise KvmConfigError(f"image {spec!r}: the URL names no file")
    algorithm = digest = ""
    if fragment:
        m = _FRAGMENT.match(fragment)
        if not m or len(m.group(2)) != DIGEST_LENGTHS[m.group(1)]:
            raise KvmConfigError(
                f"image {spec!r}: the URL fragment must be sha256=HEX (64 hex digits) "
                f"or sha512=HEX (128), not {fragment!r}"
            )
        algorithm, digest = m.group(1), m.group(2).lower()
    stem = url_stem(url)
    key = f"{stem[:60]}-{hashlib.sha256(url.encode()).hexdigest()[:12]}"
    return Source(url=url, key=key, label=stem, algorithm=algorithm, digest=digest)


def check_url(spec: str) -> None:
    """Start-up checks of a URL value: its form, and that a file:// source exists."""
    source = parse_url(spec)
    if source.is_file:
        path = file_path(source.url)
        if not path.is_file():
            raise ImageError(f"image {spec!r}: {str(path)!r} does not exist or is not a file")


def file_path(url: str) -> Path:
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise KvmConfigError(f"image {url!r}: a file:// URL must name a local file")
    return Path(urllib.request.url2pathname(parts.path))


def catalog_source(name: str) -> Source:
    """The Source of the downloaded catalog image ``name`` (``catalog/cloud/NAME.toml``)."""
    from .recipe import load_download

    entry = load_download(name)
    return Source(
        url=entry.url,
        key=name,
        label=name,
        algorithm=entry.checksum,
        checksum_url=entry.checksum_url,
        checksum_name=entry.checksum_name or _file_name(entry.url),
        format=entry.format,
        signing_key=entry.signing_key,
    )


# --- checksum files ---------------------------------------------------------

_BSD = re.compile(r"^(SHA\d+)\s*\((.+)\)\s*=\s*([0-9A-Fa-f]+)$")
_GNU = re.compile(r"^\\?([0-9A-Fa-f]+)\s+[* ]?(.+)$")
_HEX = re.compile(r"^[0-9A-Fa-f]+$")


def parse_checksums(text: str, name: str, algorithm: str, where: str = "checksum file") -> str:
    """The digest ``text`` lists for file ``name``, in lower case.

    Understands GNU coreutils lines (``HEX  NAME``, ``HEX *NAME``), BSD lines
    (``SHA256 (NAME) = HEX``, as in Fedora's and Rocky's CHECKSUM files, which may
    carry ``#`` comments) and a file that is one digest. A PGP clear-signed file is
    refused: :func:`verified_text` checks it and gives what it signs.
    """
    length = DIGEST_LENGTHS[algorithm]
    if is_clearsigned(text):
        raise ImageError(
            f"{where} is PGP-signed and was not checked: its catalog entry needs a signing_key"
        )
    lines = text.splitlines()
    found: list[str] = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if m := _BSD.match(line):
            label, listed, digest = m.groups()
            if label.lower() == algorithm and _same_file(listed, name) and len(digest) == length:
                found.append(digest.lower())
        elif m := _GNU.match(line):
            digest, listed = m.groups()
            if _same_file(listed, name) and len(digest) == length:
                found.append(digest.lower())
    if not found:
        tokens = " ".join(lines).split()
        if len(tokens) == 1 and _HEX.match(tokens[0]) and len(tokens[0]) == length:
            return tokens[0].lower()
        raise ImageError(f"{where} lists no {algorithm} digest for {name!r}")
    if len(set(found)) > 1:
        raise ImageError(f"{where} lists different {algorithm} digests for {name!r}")
    return found[0]


_CLEARSIGNED = "-----BEGIN PGP SIGNED MESSAGE-----"
#: Seconds gpgv may take to check a checksum file.
GPGV_TIMEOUT = 60.0


def is_clearsigned(text: str) -> bool:
    return any(line.startswith(_CLEARSIGNED) for line in text.splitlines())


def verified_text(raw: bytes, key: Path, where: str) -> str:
    """What the PGP clear-signed ``raw`` says, once gpgv found its signature good and
    made by ``key`` (a binary keyring); an ImageError otherwise. Only the signed text
    is returned: nothing around the signature is trusted."""
    gpgv = shutil.which("gpgv")
    if gpgv is None:
        raise ImageError(
            f"{where} is PGP-signed and checking it needs gpgv, which is not installed "
            "(Debian package: gpgv)"
        )
    with tempfile.TemporaryDirectory(prefix="pytest-kvm-gpgv-") as tmp:
        signed, out = Path(tmp) / "checksums.asc", Path(tmp) / "checksums"
        signed.write_bytes(raw)
        try:
            proc = subprocess.run(
                [gpgv, "--homedir", tmp, "--keyring", str(key.resolve()),
                 "--output", str(out), "--", str(signed)],
                capture_output=True, text=True, timeout=GPGV_TIMEOUT,
            )  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ImageError(f"{where}: gpgv did not run: {exc}") from None
        if proc.returncode != 0 or not out.is_file():
            why = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
            raise ImageError(
                f"{where}: its PGP signature is not good with the key {key} (gpgv: {why[0]}); "
                "the file was changed or is not signed by its publisher, so it is not used"
            )
        return out.read_text("utf-8", "replace")


def _same_file(listed: str, name: str) -> bool:
    listed = listed.strip().lstrip("*")
    return listed == name or listed.rsplit("/", 1)[-1] == name


def fetch_checksum(source: Source) -> str:
    """The digest the source's checksum file publishes for its image."""
    where = f"checksum file {source.checksum_url}"
    try:
        if source.checksum_url.lower().startswith("file://"):
            raw = file_path(source.checksum_url).read_bytes()
        else:
            with _open(source.checksum_url, _HEADERS) as resp:
                raw = resp.read(4 * _MIB)
    except (OSError, http.client.HTTPException) as exc:
        raise ImageError(f"{source.label}: cannot fetch {where}: {_reason(exc)}") from None
    if source.signing_key is not None:
        text = verified_text(raw, source.signing_key, f"{source.label}: {where}")
    else:
        text = raw.decode("utf-8", "replace")
    name = source.checksum_name or source.filename
    return parse_checksums(text, name, source.algorithm, f"{source.label}: {where}")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return str(exc) or type(exc).__name__


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
    pointer = _read_json(directory / CURRENT) or {}
    version, name = pointer.get("version"), pointer.get("file")
    if not isinstance(version, str) or not _VERSION.match(version) or not isinstance(name, str):
        return None
    if filename is not None and name != filename:
        return None
    target = directory / version / name
    return target if target.is_file() else None


def _set_current(directory: Path, target: Path) -> None:
    _write_json(directory / CURRENT, {"version": target.parent.name, "file": target.name})


def _record(source: Source, target: Path) -> dict[str, Any] | None:
    """What was recorded when ``target`` was verified, if it still describes it."""
    record = _read_json(_record_path(target))
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


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _write_json(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


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
        actual = _copy(source, part, algorithm, progress)
        origin = file_path(source.url).stat()
        source_stat: list[int] | None = [origin.st_size, origin.st_mtime_ns]
    else:
        actual = _http(source, part, algorithm, progress)
        source_stat = None
    if expected and actual != expected:
        part.unlink(missing_ok=True)
        _part_meta(part).unlink(missing_ok=True)
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
    _part_meta(part).unlink(missing_ok=True)
    st = target.stat()
    _write_json(
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


class _Meter:
    """Progress lines, at most one per :data:`PROGRESS_INTERVAL` seconds, and a last one."""

    def __init__(self, label: str, progress: Progress, total: int | None, start: int) -> None:
        self.label = label
        self.progress = progress
        self.total = total
        self.done = start
        self.start_bytes = start
        self.started = self.last = time.monotonic()

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= PROGRESS_INTERVAL:
            self.last = now
            self.progress(f"pytest-kvm: downloading {self.label}: {self._state(now)}")

    def finish(self) -> None:
        now = time.monotonic()
        self.progress(f"pytest-kvm: downloaded {self.label}: {self._state(now)}")

    def _state(self, now: float) -> str:
        rate = (self.done - self.start_bytes) / max(now - self.started, 1e-3) / _MIB
        size = f"{self.done / _MIB:.1f}"
        if self.total:
            percent = f"{100 * self.done / self.total:3.0f}% "
            size += f"/{self.total / _MIB:.1f}"
        else:
            percent = ""
        return f"{percent}{size} MiB, {rate:.1f} MiB/s"


def _copy(source: Source, part: Path, algorithm: str, progress: Progress) -> str:
    origin = file_path(source.url)
    hasher = hashlib.new(algorithm)
    try:
        total = origin.stat().st_size
        progress(f"pytest-kvm: copying {source.label} from {origin} ({total / _MIB:.1f} MiB)")
        meter = _Meter(source.label, progress, total, 0)
        with origin.open("rb") as src, part.open("wb") as dst:
            while chunk := src.read(CHUNK):
                dst.write(chunk)
                hasher.update(chunk)
                meter.add(len(chunk))
    except OSError as exc:
        part.unlink(missing_ok=True)
        raise ImageError(f"image {source.label!r}: cannot copy {origin}: {exc}") from None
    meter.finish()
    return hasher.hexdigest()


_HEADERS = {"User-Agent": "pytest-kvm (image download)", "Accept-Encoding": "identity"}


class NoDowngrade(urllib.request.HTTPRedirectHandler):
    """Redirects are followed, but never from https to plain http: a download asked
    for over TLS is not handed to whoever answers on the path in clear text."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        was = urllib.parse.urlsplit(req.full_url).scheme.lower()
        if was == "https" and urllib.parse.urlsplit(newurl).scheme.lower() != "https":
            raise ImageError(
                f"refusing the redirect of {req.full_url} to {newurl}: from https to plain http"
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _open(url: str, headers: dict[str, str]) -> Any:
    """A GET of an http(s) URL (proxies from the environment, as urllib does)."""
    if urllib.parse.urlsplit(url).scheme.lower() not in ("http", "https"):
        raise ImageError(f"not an http(s) URL: {url}")
    request = urllib.request.Request(url, headers=headers)  # noqa: S310 (checked above)
    return urllib.request.build_opener(NoDowngrade).open(request, timeout=TIMEOUT)


def _part_meta(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _hash_file(path: Path, algorithm: str) -> Any:
    hasher = hashlib.new(algorithm)
    with path.open("rb") as f:
        while chunk := f.read(4 * _MIB):
            hasher.update(chunk)
    return hasher


class _Retry(Exception):
    """A try ended early (connection dropped, short body, server error)."""


def _http(source: Source, part: Path, algorithm: str, progress: Progress) -> str:
    """Download ``source.url`` into ``part``, resuming what is there; its digest."""
    last = ""
    for attempt in range(ATTEMPTS):
        if attempt:
            time.sleep(RETRY_DELAY * 2 ** (attempt - 1))
        try:
            return _http_try(source, part, algorithm, progress)
        except _Retry as exc:
            last = str(exc)
            progress(f"pytest-kvm: download of {source.label} interrupted ({last}); retrying")
    raise ImageError(
        f"image {source.label!r}: download of {source.url} failed {ATTEMPTS} times "
        f"(last: {last}); {part} is kept and the next run resumes it"
    )


def _http_try(source: Source, part: Path, algorithm: str, progress: Progress) -> str:
    have = part.stat().st_size if part.exists() else 0
    meta = _read_json(_part_meta(part)) or {}
    headers = dict(_HEADERS)
    if have:
        headers["Range"] = f"bytes={have}-"
        validator = meta.get("etag") or meta.get("last_modified")
        if validator:
            headers["If-Range"] = validator
    try:
        resp = _open(source.url, headers)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the part is not a prefix of what is served now
            part.unlink(missing_ok=True)
            raise _Retry("the server refused to resume; starting again") from None
        if exc.code >= 500 or exc.code in (408, 429):
            raise _Retry(_reason(exc)) from None
        raise ImageError(
            f"image {source.label!r}: cannot download {source.url}: {_reason(exc)}"
        ) from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, socket.gaierror):  # an unknown host stays unknown
            raise ImageError(
                f"image {source.label!r}: cannot download {source.url}: {_reason(exc)}"
            ) from None
        raise _Retry(_reason(exc)) from None
    except (OSError, http.client.HTTPException) as exc:
        raise _Retry(_reason(exc)) from None
    with resp:
        start = 0
        total = _int(resp.headers.get("Content-Length"))
        if resp.status == 206:
            m = re.match(r"bytes (\d+)-\d+/(\d+|\*)", resp.headers.get("Content-Range", ""))
            if not have or not m or int(m.group(1)) != have:
                part.unlink(missing_ok=True)
                raise _Retry("the server sent another range than asked for; starting again")
            start = have
            total = int(m.group(2)) if m.group(2) != "*" else None
        if start:
            hasher = _hash_file(part, algorithm)
            progress(f"pytest-kvm: resuming {source.label} at {start / _MIB:.1f} MiB")
        else:
            hasher = hashlib.new(algorithm)
            size = f" ({total / _MIB:.1f} MiB)" if total else ""
            progress(f"pytest-kvm: downloading {source.label} from {source.url}{size}")
        validators = {
            "etag": resp.headers.get("ETag"),
            "last_modified": resp.headers.get("Last-Modified"),
        }
        _write_json(_part_meta(part), {k: v for k, v in validators.items() if v})
        meter = _Meter(source.label, progress, total, start)
        try:
            with part.open("r+b" if start else "wb") as out:
                out.seek(start)
                out.truncate()
                while chunk := _read(resp):
                    out.write(chunk)
                    hasher.update(chunk)
                    meter.add(len(chunk))
        except OSError as exc:  # the disk, not the network: _read raises _Retry
            raise ImageError(f"image {source.label!r}: cannot write {part}: {exc}") from None
        if total is not None and meter.done != total:
            raise _Retry(f"got {meter.done} of {total} bytes")
    meter.finish()
    digest: str = hasher.hexdigest()
    return digest


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _read(resp: Any) -> bytes:
    try:
        chunk: bytes = resp.read(CHUNK)
    except (OSError, http.client.HTTPException) as exc:
        raise _Retry(_reason(exc)) from None
    return chunk


def remove(source: Source, cache: Path) -> None:
    """Delete everything cached for ``source``."""
    shutil.rmtree(cache_dir(source, cache), ignore_errors=True)
