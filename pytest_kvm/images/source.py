"""Where a downloaded image comes from: :class:`Source`, made from a URL
``--kvm-image`` value or a downloaded catalog entry, and the URL rules.
"""

from __future__ import annotations

import hashlib
import re
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..errors import ImageError, KvmConfigError

DIGEST_LENGTHS = {"sha256": 64, "sha512": 128}
_FRAGMENT = re.compile(r"^(sha256|sha512)=([0-9a-fA-F]+)$")
_SAFE = re.compile(r"[^A-Za-z0-9._+-]")


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
        return file_name(self.url)

    @property
    def is_file(self) -> bool:
        return self.url.lower().startswith("file://")


def file_name(url: str) -> str:
    name = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1])
    name = _SAFE.sub("_", name).lstrip(".")[:120]
    return name or "image"


def url_stem(url: str) -> str:
    """The readable name of a URL's image: its file name without the disk suffix."""
    stem = file_name(url.split("#", 1)[0])
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
        checksum_name=entry.checksum_name or file_name(entry.url),
        format=entry.format,
        signing_key=entry.signing_key,
    )
