"""Bytes onto the disk: an http(s) download that resumes and retries, a file://
copy, both hashed as they go, with progress lines; and the small JSON files kept
beside downloads.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ImageError
from .source import Source, file_path

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

Progress = Callable[[str], None]


def reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return str(exc) or type(exc).__name__


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def write_json(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


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


def copy_file(source: Source, part: Path, algorithm: str, progress: Progress) -> str:
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


HEADERS = {"User-Agent": "pytest-kvm (image download)", "Accept-Encoding": "identity"}


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


def open_url(url: str, headers: dict[str, str]) -> Any:
    """A GET of an http(s) URL (proxies from the environment, as urllib does)."""
    if urllib.parse.urlsplit(url).scheme.lower() not in ("http", "https"):
        raise ImageError(f"not an http(s) URL: {url}")
    request = urllib.request.Request(url, headers=headers)  # noqa: S310 (checked above)
    return urllib.request.build_opener(NoDowngrade).open(request, timeout=TIMEOUT)


def part_meta(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _hash_file(path: Path, algorithm: str) -> Any:
    hasher = hashlib.new(algorithm)
    with path.open("rb") as f:
        while chunk := f.read(4 * _MIB):
            hasher.update(chunk)
    return hasher


class _Retry(Exception):
    """A try ended early (connection dropped, short body, server error)."""


def http_download(source: Source, part: Path, algorithm: str, progress: Progress) -> str:
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
    meta = read_json(part_meta(part)) or {}
    headers = dict(HEADERS)
    if have:
        headers["Range"] = f"bytes={have}-"
        validator = meta.get("etag") or meta.get("last_modified")
        if validator:
            headers["If-Range"] = validator
    try:
        resp = open_url(source.url, headers)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the part is not a prefix of what is served now
            part.unlink(missing_ok=True)
            raise _Retry("the server refused to resume; starting again") from None
        if exc.code >= 500 or exc.code in (408, 429):
            raise _Retry(reason(exc)) from None
        raise ImageError(
            f"image {source.label!r}: cannot download {source.url}: {reason(exc)}"
        ) from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, socket.gaierror):  # an unknown host stays unknown
            raise ImageError(
                f"image {source.label!r}: cannot download {source.url}: {reason(exc)}"
            ) from None
        raise _Retry(reason(exc)) from None
    except (OSError, http.client.HTTPException) as exc:
        raise _Retry(reason(exc)) from None
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
        write_json(part_meta(part), {k: v for k, v in validators.items() if v})
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
        raise _Retry(reason(exc)) from None
    return chunk
