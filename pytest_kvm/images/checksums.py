"""Checksum files: the digest one publishes for an image, after gpgv checked its
PGP signature when the catalog entry names a signing key.
"""

from __future__ import annotations

import http.client
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..errors import ImageError
from .fetching import HEADERS, open_url, reason
from .source import DIGEST_LENGTHS, Source, file_path

_MIB = 1024 * 1024
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
            with open_url(source.checksum_url, HEADERS) as resp:
                raw = resp.read(4 * _MIB)
    except (OSError, http.client.HTTPException) as exc:
        raise ImageError(f"{source.label}: cannot fetch {where}: {reason(exc)}") from None
    if source.signing_key is not None:
        text = verified_text(raw, source.signing_key, f"{source.label}: {where}")
    else:
        text = raw.decode("utf-8", "replace")
    name = source.checksum_name or source.filename
    return parse_checksums(text, name, source.algorithm, f"{source.label}: {where}")
