"""Find the Debian mirror this machine already uses, from apt's own sources.

Images are built from the archive the host is configured for, so that a build
works wherever ``apt-get install`` works and no registry host is baked into the
code. ``PYTEST_KVM_MIRROR`` overrides the choice.

Both source formats are read, in apt's order: ``/etc/apt/sources.list``, then
``/etc/apt/sources.list.d/*.list`` (one-line style) and ``*.sources`` (deb822
style) in file name order. The first ``deb`` entry that is a Debian archive
(one of its suites names a Debian release, or its URI path ends in
``/debian``) and is not a security archive wins.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import KvmConfigError

MIRROR_ENV = "PYTEST_KVM_MIRROR"

#: Release code names and the suite aliases that point at them.
DEBIAN_SUITES = frozenset(
    {
        "buzz", "rex", "bo", "hamm", "slink", "potato", "woody", "sarge", "etch",
        "lenny", "squeeze", "wheezy", "jessie", "stretch", "buster", "bullseye",
        "bookworm", "trixie", "forky", "duke", "sid", "experimental",
        "oldoldstable", "oldstable", "stable", "testing", "unstable",
    }
)  # fmt: skip

_SCHEMES = ("http", "https", "ftp", "file")


@dataclass(frozen=True)
class SourceEntry:
    """One ``deb`` line (or one URI of a deb822 stanza)."""

    uri: str
    suites: tuple[str, ...]
    origin: str  # "file:line" for messages


def _is_security(entry: SourceEntry) -> bool:
    path = urlsplit(entry.uri).path.rstrip("/")
    if path.endswith("-security") or path.endswith("/security"):
        return True
    return any(s.endswith("-security") or s.endswith("/updates") for s in entry.suites)


def _is_debian(entry: SourceEntry) -> bool:
    if urlsplit(entry.uri).path.rstrip("/").endswith("/debian"):
        return True
    return any(s.split("-", 1)[0].split("/", 1)[0] in DEBIAN_SUITES for s in entry.suites)


def _usable(entry: SourceEntry) -> bool:
    return urlsplit(entry.uri).scheme in _SCHEMES and _is_debian(entry) and not _is_security(entry)


def parse_one_line(text: str, origin: str) -> Iterator[SourceEntry]:
    """Entries of a ``sources.list``-style file (``deb [opts] uri suite comp...``)."""
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        kind, _, rest = line.partition(" ")
        if kind != "deb":
            continue
        rest = rest.strip()
        if rest.startswith("["):
            end = rest.find("]")
            if end < 0:
                continue
            rest = rest[end + 1 :].strip()
        words = rest.split()
        if len(words) < 2:
            continue
        yield SourceEntry(words[0], (words[1],), f"{origin}:{lineno}")


def _deb822_stanzas(text: str) -> Iterator[tuple[int, dict[str, str]]]:
    fields: dict[str, str] = {}
    start = 0
    key = ""
    for lineno, raw in enumerate(text.splitlines(), 1):
        if raw.startswith("#"):
            continue
        if not raw.strip():
            if fields:
                yield start, fields
            fields, key = {}, ""
            continue
        if raw[0] in " \t":
            if key:
                fields[key] += "\n" + raw.strip()
            continue
        name, sep, value = raw.partition(":")
        if not sep:
            continue
        if not fields:
            start = lineno
        key = name.strip().lower()
        fields[key] = value.strip()
    if fields:
        yield start, fields


def parse_deb822(text: str, origin: str) -> Iterator[SourceEntry]:
    """Entries of a deb822 ``.sources`` file; disabled stanzas are skipped."""
    for lineno, fields in _deb822_stanzas(text):
        if fields.get("enabled", "yes").strip().lower() in ("no", "false", "0"):
            continue
        if "deb" not in fields.get("types", "").split():
            continue
        suites = tuple(fields.get("suites", "").split())
        for uri in fields.get("uris", "").split():
            yield SourceEntry(uri, suites, f"{origin}:{lineno}")


def source_entries(apt_dir: Path = Path("/etc/apt")) -> Iterator[SourceEntry]:
    """Every ``deb`` entry apt would read, in apt's order."""
    main = apt_dir / "sources.list"
    if main.is_file():
        yield from parse_one_line(main.read_text(errors="replace"), str(main))
    parts = apt_dir / "sources.list.d"
    if not parts.is_dir():
        return
    for path in sorted(parts.iterdir(), key=lambda p: p.name):
        if not path.is_file():
            continue
        if path.suffix == ".list":
            yield from parse_one_line(path.read_text(errors="replace"), str(path))
        elif path.suffix == ".sources":
            yield from parse_deb822(path.read_text(errors="replace"), str(path))


def debian_mirror(
    *, environ: Mapping[str, str] | None = None, apt_dir: Path = Path("/etc/apt")
) -> str:
    """The Debian archive URL to build images from, without a trailing slash.

    Raises :class:`KvmConfigError` if ``PYTEST_KVM_MIRROR`` is malformed or no
    usable entry is found.
    """
    env = os.environ if environ is None else environ
    override = env.get(MIRROR_ENV, "").strip()
    if override:
        parts = urlsplit(override)
        valid = bool(parts.netloc) if parts.scheme != "file" else bool(parts.path)
        if parts.scheme not in _SCHEMES or not valid:
            raise KvmConfigError(
                f"{MIRROR_ENV}={override!r} is not a mirror URL; "
                "expected e.g. http://HOST/debian or file:///srv/debian"
            )
        return override.rstrip("/")
    for entry in source_entries(apt_dir):
        if _usable(entry):
            return entry.uri.rstrip("/")
    raise KvmConfigError(
        f"no Debian mirror found in {apt_dir / 'sources.list'} or "
        f"{apt_dir / 'sources.list.d'}/*.list|*.sources (wanted a 'deb' entry for a "
        f"Debian suite such as bookworm, not -security); set {MIRROR_ENV}=http://HOST/debian"
    )
