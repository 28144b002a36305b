"""Images by URL and downloaded catalog images, against a local HTTP server (127.0.0.1)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pytest_kvm.config import resolve as resolve_settings
from pytest_kvm.errors import ImageError, KvmConfigError
from pytest_kvm.images import download, fetching
from pytest_kvm.images.download import parse_checksums, parse_url
from pytest_kvm.images.recipe import (
    RECIPES_ENV,
    catalog_names,
    download_names,
    load_download,
    load_download_file,
)
from pytest_kvm.images.store import check_spec, classify, image_name, resolve
from pytest_kvm.uselock import release
from tests.support.images import qcow2_bytes
from tests.support.imageserver import ImageServer, tls_context

NAME = "disk.qcow2"


@pytest.fixture(scope="module")
def qcow2(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return qcow2_bytes(tmp_path_factory.mktemp("img") / NAME)


@pytest.fixture
def server(qcow2: bytes) -> Iterator[ImageServer]:
    srv = ImageServer(files={"/" + NAME: qcow2}).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fetching, "RETRY_DELAY", 0.0)


@pytest.fixture
def lines() -> list[str]:
    return []


def pinned(server: ImageServer, data: bytes, algorithm: str = "sha256") -> str:
    return f"{server.url(NAME)}#{algorithm}={hashlib.new(algorithm, data).hexdigest()}"


def files_in(directory: Path) -> list[str]:
    return sorted(
        p.name for p in directory.rglob("*") if p.is_file() and p.name not in (".lock", ".use")
    )


# --- checksum files -------------------------------------------------------------

H256 = "ab" * 32
H512 = "cd" * 64
FEDORA_BODY = f"""# Fedora-Cloud-Base-Generic-41-1.4.x86_64.qcow2: 491716608 bytes
SHA256 (Fedora-Cloud-Base-Generic-41-1.4.x86_64.qcow2) = {H256}
# Fedora-Cloud-Base-Generic-41-1.4.x86_64.raw.xz: 1 bytes
SHA256 (Fedora-Cloud-Base-Generic-41-1.4.x86_64.raw.xz) = {"00" * 32}
"""
FEDORA = f"""-----BEGIN PGP SIGNED MESSAGE-----
Hash: SHA256

{FEDORA_BODY}-----BEGIN PGP SIGNATURE-----

iQIzBAEBCAAdFiEE
-----END PGP SIGNATURE-----
"""


def test_a_signed_checksum_file_is_not_read_unchecked() -> None:
    with pytest.raises(ImageError, match="PGP-signed and was not checked"):
        parse_checksums(FEDORA, "Fedora-Cloud-Base-Generic-41-1.4.x86_64.qcow2", "sha256")


@pytest.mark.parametrize(
    ("text", "name", "algorithm", "digest"),
    [
        (f"{'11' * 64}  other.qcow2\n{H512}  debian.qcow2\n", "debian.qcow2", "sha512", H512),
        (f"{H256} *ubuntu.img\n{'22' * 32} *ubuntu.tar.gz\n", "ubuntu.img", "sha256", H256),
        (FEDORA_BODY, "Fedora-Cloud-Base-Generic-41-1.4.x86_64.qcow2", "sha256", H256),
        (f"SHA512 (alpine.qcow2) = {H512.upper()}\n", "alpine.qcow2", "sha512", H512),
        (f"{H512}  alpine.qcow2\n", "alpine.qcow2", "sha512", H512),
        (f"{H512}\n", "alpine.qcow2", "sha512", H512),  # a lone digest
        (f"{H256}  ./sub/rocky.qcow2\n", "rocky.qcow2", "sha256", H256),
    ],
)
def test_checksum_file_formats(text: str, name: str, algorithm: str, digest: str) -> None:
    assert parse_checksums(text, name, algorithm) == digest


@pytest.mark.parametrize(
    "text",
    [
        f"{H256}  other.qcow2\n",  # not listed
        f"{H256}  x.qcow2\n",  # a sha256 where a sha512 is expected
        f"SHA256 (x.qcow2) = {H512}\n",  # the wrong algorithm's label
        "<html>Not Found</html>",
    ],
)
def test_checksum_file_without_the_image_is_an_error(text: str) -> None:
    with pytest.raises(ImageError, match=r"lists no sha512 digest for 'x.qcow2'"):
        parse_checksums(text, "x.qcow2", "sha512")


# --- URL values ----------------------------------------------------------------


def test_url_values_are_checked_at_start_up(tmp_path: Path) -> None:
    assert classify("https://h.example/a.qcow2#sha256=" + H256) == "url"
    assert image_name("https://h.example/dir/a.qcow2#sha256=" + H256) == "a"
    check_spec("https://h.example/a.qcow2#sha512=" + H512)  # no request is made
    with pytest.raises(KvmConfigError, match="sha256=HEX"):
        check_spec("https://h.example/a.qcow2#sha256=abc")
    with pytest.raises(KvmConfigError, match="sha256=HEX"):
        check_spec("https://h.example/a.qcow2#md5=" + "0" * 32)
    with pytest.raises(KvmConfigError, match="no host"):
        check_spec("http:///a.qcow2")
    with pytest.raises(ImageError, match="does not exist"):
        check_spec(f"file://{tmp_path}/missing.qcow2")
    with pytest.raises(KvmConfigError, match="scheme 'ftp' is not supported"):
        check_spec("ftp://h.example/a.qcow2")
    a = parse_url("https://h.example/a.qcow2")
    assert a.key != parse_url("https://other.example/a.qcow2").key  # cached apart
    assert a.key.startswith("a-") and a.filename == "a.qcow2"


def test_pinned_url_is_downloaded_verified_and_cached(
    server: ImageServer, qcow2: bytes, tmp_path: Path, lines: list[str]
) -> None:
    spec = pinned(server, qcow2)
    image = resolve(spec, tmp_path, lines.append)
    assert (image.name, image.format, image.source) == ("disk", "qcow2", spec)
    assert image.virtual_size == 16 << 20
    digest = hashlib.sha256(qcow2).hexdigest()
    assert image.path.parent.parent.parent == tmp_path / "downloads"
    assert image.path.parent.name == f"sha256-{digest[:32]}"  # the version's own path
    assert image.path.read_bytes() == qcow2
    assert files_in(tmp_path / "downloads") == ["current.json", NAME, NAME + ".json"]
    assert len(server.requests(NAME)) == 1
    # cached: used again without any request, and offline too
    assert resolve(spec, tmp_path, lines.append).path == image.path
    assert resolve(spec, tmp_path, lines.append, offline=True).path == image.path
    assert len(server.requests(NAME)) == 1


def test_wrong_checksum_is_an_error_and_nothing_is_kept(
    server: ImageServer, qcow2: bytes, tmp_path: Path, lines: list[str]
) -> None:
    wrong = "0" * 64
    with pytest.raises(ImageError) as info:
        resolve(f"{server.url(NAME)}#sha256={wrong}", tmp_path, lines.append)
    actual = hashlib.sha256(qcow2).hexdigest()
    assert f"expected sha256 {wrong}, got {actual}" in str(info.value)
    assert files_in(tmp_path / "downloads") == []  # no image, no part, no record


def test_an_interrupted_download_resumes_with_a_range_request(
    server: ImageServer, qcow2: bytes, tmp_path: Path, lines: list[str]
) -> None:
    server.drops["/" + NAME] = [300_000]  # the first response stops after 300 kB
    image = resolve(pinned(server, qcow2), tmp_path, lines.append)
    assert image.path.read_bytes() == qcow2
    first, second = server.requests(NAME)
    assert (first.status, first.sent, first.range) == (200, 300_000, None)
    assert second.status == 206
    assert second.range == "bytes=300000-"
    assert second.if_range is not None  # the ETag: a changed file is not spliced
    assert server.sent(NAME) < 2 * len(qcow2)
    assert any("resuming disk at 0.3 MiB" in line for line in lines), lines


def test_a_failed_download_keeps_its_part_for_the_next_run(
    server: ImageServer, qcow2: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fetching, "ATTEMPTS", 2)
    server.drops["/" + NAME] = [200_000, 0]  # 200 kB, then nothing
    spec = pinned(server, qcow2)
    with pytest.raises(ImageError, match=r"failed 2 times .* the next run resumes it"):
        resolve(spec, tmp_path, lambda _: None)
    parts = list((tmp_path / "downloads").rglob("*.part"))
    assert [p.stat().st_size for p in parts] == [200_000]
    resolve(spec, tmp_path, lambda _: None)
    assert server.requests(NAME)[-1].range == "bytes=200000-"
    assert server.sent(NAME) == len(qcow2)  # every byte sent once


def test_offline_refuses_what_is_not_cached(
    server: ImageServer, qcow2: bytes, tmp_path: Path
) -> None:
    spec = pinned(server, qcow2)
    with pytest.raises(ImageError, match=r"not in the cache .* --kvm-offline forbids downloading"):
        resolve(spec, tmp_path, lambda _: None, offline=True)
    assert server.seen == []


def test_http_errors_are_image_errors(server: ImageServer, tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"cannot download .*missing.qcow2: HTTP 404"):
        resolve(server.url("missing.qcow2"), tmp_path, lambda _: None)
    assert len(server.seen) == 1  # a 404 is not retried


def test_a_download_that_is_no_disk_image_is_dropped(
    server: ImageServer, tmp_path: Path, lines: list[str]
) -> None:
    server.files["/page.qcow2"] = b"<html>a captive portal</html>\n" * 100
    with pytest.raises(ImageError, match="is not a disk image"):
        resolve(server.url("page.qcow2"), tmp_path, lines.append)
    assert any("not verified (pin it with #sha256=" in line for line in lines), lines
    assert files_in(tmp_path / "downloads") == []


def test_parallel_resolves_download_once(
    server: ImageServer, qcow2: bytes, tmp_path: Path, lines: list[str]
) -> None:
    server.delay = 0.03  # ~0.3 s for the whole file: the second caller must wait
    spec = pinned(server, qcow2)
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(resolve(spec, tmp_path, lines.append).path)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert len(set(results)) == 1 and len(results) == 3
    assert [s.status for s in server.requests(NAME)] == [200]
    assert server.sent(NAME) == len(qcow2)
    assert any("waiting for another process downloading disk" in line for line in lines)


def test_progress_lines_are_throttled(
    server: ImageServer, qcow2: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fetching, "CHUNK", 16 * 1024)
    quiet: list[str] = []
    resolve(pinned(server, qcow2), tmp_path / "a", quiet.append)
    # default interval (2 s): the start and the end, not a line per 16 KiB chunk
    assert len(quiet) == 2, quiet
    assert quiet[0].startswith("pytest-kvm: downloading disk from http://127.0.0.1:")
    assert quiet[1].startswith("pytest-kvm: downloaded disk: 100% ")
    assert "MiB/s" in quiet[1]
    monkeypatch.setattr(fetching, "PROGRESS_INTERVAL", 0.0)
    chatty: list[str] = []
    resolve(pinned(server, qcow2), tmp_path / "b", chatty.append)
    percents = [line for line in chatty if line.startswith("pytest-kvm: downloading disk: ")]
    assert len(percents) > 10
    assert all("%" in line and "MiB" in line for line in percents)


def test_file_url_is_copied_and_checked(qcow2: bytes, tmp_path: Path) -> None:
    source = tmp_path / "src" / "local disk.qcow2"
    source.parent.mkdir()
    source.write_bytes(qcow2)
    url = source.as_uri()
    image = resolve(f"{url}#sha256={hashlib.sha256(qcow2).hexdigest()}", tmp_path / "c")
    assert image.path != source and image.path.read_bytes() == qcow2
    assert image.name == "local_disk"
    # allowed offline: nothing is downloaded
    assert resolve(url, tmp_path / "c2", lambda _: None, offline=True).format == "qcow2"
    with pytest.raises(ImageError, match="checksum mismatch"):
        resolve(f"{url}#sha256={'1' * 64}", tmp_path / "c3", lambda _: None)


# --- downloaded catalog images ----------------------------------------------------


@pytest.fixture
def catalog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "images"
    (directory / "cloud").mkdir(parents=True)
    monkeypatch.setenv(RECIPES_ENV, str(directory))
    return directory / "cloud"


def entry(url: str, checksum_url: str, algorithm: str = "sha256", signing_key: str = "") -> str:
    return (
        'description = "test cloud image"\n[download]\n'
        f'url = "{url}"\nchecksum_url = "{checksum_url}"\nchecksum = "{algorithm}"\n'
        + (f'signing_key = "{signing_key}"\n' if signing_key else "")
    )


@pytest.mark.parametrize(
    ("algorithm", "form"),
    [("sha256", "{hex} *{name}\n"), ("sha512", "SHA512 ({name}) = {hex}\n"), ("sha512", "{hex}")],
)
def test_catalog_image_checks_the_published_checksum(
    server: ImageServer, qcow2: bytes, tmp_path: Path, catalog: Path, algorithm: str, form: str
) -> None:
    digest = hashlib.new(algorithm, qcow2).hexdigest()
    server.files["/SUMS"] = form.format(hex=digest, name=NAME).encode()
    (catalog / "cloudy-1.toml").write_text(entry(server.url(NAME), server.url("SUMS"), algorithm))
    check_spec("cloudy-1")
    cache = tmp_path / "cache"
    image = resolve("cloudy-1", cache, lambda _: None)
    assert image.name == "cloudy-1" and image.format == "qcow2"
    version = f"{algorithm}-{digest[:32]}"
    assert image.path == cache / "downloads" / "cloudy-1" / version / NAME
    # again: the checksum file is fetched (it may have changed), the image is not
    resolve("cloudy-1", cache, lambda _: None)
    assert len(server.requests(NAME)) == 1 and len(server.requests("SUMS")) == 2
    resolve("cloudy-1", cache, lambda _: None, offline=True)
    assert len(server.requests("SUMS")) == 2  # offline: no request at all


def test_catalog_image_with_a_wrong_published_checksum_is_refused(
    server: ImageServer, tmp_path: Path, catalog: Path
) -> None:
    server.files["/SUMS"] = f"{'e' * 64}  {NAME}\n".encode()
    (catalog / "cloudy-1.toml").write_text(entry(server.url(NAME), server.url("SUMS")))
    with pytest.raises(ImageError, match=f"expected sha256 {'e' * 64}, got "):
        resolve("cloudy-1", tmp_path, lambda _: None)
    assert files_in(tmp_path / "downloads") == []


@dataclass
class Signer:
    """A throwaway OpenPGP key, as a distribution signs its checksum files with."""

    gpg: Callable[..., bytes]
    key: Path  # the public key, binary, as a catalog entry ships it

    def sign(self, text: str) -> bytes:
        return self.gpg("--clearsign", "--output", "-", input=text.encode())


@pytest.fixture(scope="module")
def signer() -> Iterator[Signer]:
    home = Path(tempfile.mkdtemp(prefix="gpg-"))  # short: gpg-agent's socket is there
    env = dict(os.environ, GNUPGHOME=str(home))

    def gpg(*args: str, input: bytes | None = None) -> bytes:
        return subprocess.run(
            ["gpg", "--batch", "--quiet", *args], env=env, input=input,
            capture_output=True, check=True,
        ).stdout  # fmt: skip

    try:
        publisher = "Image Publisher <publisher@example.invalid>"
        gpg("--passphrase", "", "--quick-gen-key", publisher, "ed25519", "sign", "never")
        key = home / "publisher.gpg"
        key.write_bytes(gpg("--export"))
        yield Signer(gpg, key)
    finally:
        subprocess.run(["gpgconf", "--kill", "gpg-agent"], env=env, check=False)
        shutil.rmtree(home, ignore_errors=True)


def signed_entry(server: ImageServer, catalog: Path, signer: Signer, sums: bytes) -> None:
    server.files["/SUMS"] = sums
    shutil.copy(signer.key, catalog / "publisher.gpg")
    (catalog / "cloudy-1.toml").write_text(
        entry(server.url(NAME), server.url("SUMS"), signing_key="publisher.gpg")
    )


def test_a_signed_checksum_file_is_checked_with_the_entrys_key(
    server: ImageServer, qcow2: bytes, tmp_path: Path, catalog: Path, signer: Signer
) -> None:
    sums = signer.sign(f"SHA256 ({NAME}) = {hashlib.sha256(qcow2).hexdigest()}\n")
    signed_entry(server, catalog, signer, sums)
    image = resolve("cloudy-1", tmp_path, lambda _: None)
    assert image.path.read_bytes() == qcow2


def test_a_tampered_signed_checksum_file_is_refused(
    server: ImageServer, qcow2: bytes, tmp_path: Path, catalog: Path, signer: Signer
) -> None:
    evil = qcow2_bytes(tmp_path / "evil.qcow2", pattern=0x66)
    good, bad = hashlib.sha256(qcow2).hexdigest(), hashlib.sha256(evil).hexdigest()
    sums = signer.sign(f"SHA256 ({NAME}) = {good}\n").replace(good.encode(), bad.encode())
    signed_entry(server, catalog, signer, sums)
    server.files["/" + NAME] = evil  # what the tampered file vouches for
    with pytest.raises(ImageError, match="PGP signature is not good with the key"):
        resolve("cloudy-1", tmp_path, lambda _: None)
    # Unsigned, though the entry names a key: refused too.
    server.files["/SUMS"] = f"SHA256 ({NAME}) = {bad}\n".encode()
    with pytest.raises(ImageError, match="PGP signature is not good"):
        resolve("cloudy-1", tmp_path, lambda _: None)
    assert len(server.requests(NAME)) == 0 and files_in(tmp_path / "downloads") == []
    # Signed, but the entry names no key: not read unchecked.
    server.files["/SUMS"] = signer.sign(f"SHA256 ({NAME}) = {good}\n")
    (catalog / "cloudy-1.toml").write_text(entry(server.url(NAME), server.url("SUMS")))
    with pytest.raises(ImageError, match="PGP-signed and was not checked"):
        resolve("cloudy-1", tmp_path, lambda _: None)


def test_a_missing_gpgv_is_a_clear_error(
    server: ImageServer,
    qcow2: bytes,
    tmp_path: Path,
    catalog: Path,
    signer: Signer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    signed_entry(server, catalog, signer, signer.sign(f"{'0' * 64}  {NAME}\n"))
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))
    with pytest.raises(ImageError, match=r"needs gpgv, which is not installed \(Debian package"):
        resolve("cloudy-1", tmp_path, lambda _: None)


def test_catalog_image_is_downloaded_again_when_upstream_changes(
    server: ImageServer, qcow2: bytes, tmp_path: Path, catalog: Path, lines: list[str]
) -> None:
    server.files["/SUMS"] = f"{hashlib.sha256(qcow2).hexdigest()}  {NAME}\n".encode()
    (catalog / "cloudy-1.toml").write_text(entry(server.url(NAME), server.url("SUMS")))
    first = resolve("cloudy-1", tmp_path, lines.append).path.stat().st_ino
    newer = qcow2_bytes(tmp_path / "newer.qcow2", data_kib=320)
    server.files["/" + NAME] = newer
    server.files["/SUMS"] = f"{hashlib.sha256(newer).hexdigest()}  {NAME}\n".encode()
    image = resolve("cloudy-1", tmp_path, lines.append)
    assert image.path.read_bytes() == newer and image.path.stat().st_ino != first
    assert any("the published sha256 changed" in line for line in lines)
    # the checksum file is unreachable: the verified cached copy is used, with a warning
    del server.files["/SUMS"]
    assert resolve("cloudy-1", tmp_path, lines.append).path == image.path
    assert "cannot fetch checksum file" in lines[-1] and "using the cached copy" in lines[-1]


def reads_pattern(disk: Path, pattern: int) -> bool:
    """Whether a guest reading the first 640 KiB of ``disk`` would see byte ``pattern``."""
    proc = subprocess.run(
        ["qemu-io", "-r", "-f", "qcow2", "-c", f"read -P {pattern:#x} 0 640k", str(disk)],
        capture_output=True,
        text=True,
    )
    return proc.returncode == 0 and "verification failed" not in proc.stdout + proc.stderr


def test_an_overlay_keeps_its_version_when_a_newer_one_is_downloaded(
    server: ImageServer,
    tmp_path: Path,
    catalog: Path,
    lines: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    from pytest_kvm import cli

    def publish(data: bytes) -> None:
        server.files["/" + NAME] = data
        server.files["/SUMS"] = f"{hashlib.sha256(data).hexdigest()}  {NAME}\n".encode()

    older = qcow2_bytes(tmp_path / "older.qcow2", pattern=0x11)
    newer = qcow2_bytes(tmp_path / "newer.qcow2", pattern=0x22)
    (catalog / "cloudy-1.toml").write_text(entry(server.url(NAME), server.url("SUMS")))
    cache = tmp_path / "cache"
    publish(older)
    first = resolve("cloudy-1", cache, lines.append).path
    overlay = tmp_path / "guest.qcow2"  # a running guest's disk, backed by the download
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(first), "-F", "qcow2",
         str(overlay)],
        check=True,
    )  # fmt: skip
    assert reads_pattern(overlay, 0x11)
    publish(newer)  # upstream publishes a new image
    second = resolve("cloudy-1", cache, lines.append).path
    assert reads_pattern(overlay, 0x11), "the guest's disk now reads another image's blocks"
    assert second != first and second.read_bytes() == newer and first.read_bytes() == older
    assert hashlib.sha256(newer).hexdigest()[:32] in str(second)
    # The name resolves to the newest verified version, offline too.
    assert resolve("cloudy-1", cache, lines.append, offline=True).path == second
    assert download.cached(download.catalog_source("cloudy-1"), cache) == second
    # Pruning leaves the older version while a process uses it (this one does) ...
    assert cli.main(["--cache", str(cache), "template", "prune", "--no-libvirt"]) == 0
    out = capsys.readouterr().out
    assert f"kept {first.parent}: an older download in use" in out and first.exists()
    # ... and removes it once nothing does; the current one stays.
    release(first.parent / download.USE_LOCK)
    assert cli.main(["--cache", str(cache), "template", "prune", "--no-libvirt"]) == 0
    out = capsys.readouterr().out
    assert f"removed {first.parent}: superseded by a newer download" in out
    assert not first.exists() and second.read_bytes() == newer


def test_catalog_image_not_cached_offline(tmp_path: Path, catalog: Path) -> None:
    (catalog / "cloudy-1.toml").write_text(
        entry("https://h.example/x.qcow2", "https://h.example/SUMS")
    )
    with pytest.raises(ImageError, match=r"'cloudy-1' \(https://h.example/x.qcow2\) is not in"):
        resolve("cloudy-1", tmp_path, lambda _: None, offline=True)


def test_bad_catalog_entries_name_file_and_key(catalog: Path) -> None:
    bad = catalog / "bad.toml"
    bad.write_text(entry("https://h/x.qcow2", "https://h/S", "md5"))
    with pytest.raises(ImageError, match=r"bad.toml \[download\]: 'checksum' is 'md5'"):
        load_download("bad")
    bad.write_text(entry("ftp://h/x.qcow2", "https://h/S"))
    with pytest.raises(ImageError, match="'url' is not an http"):
        load_download("bad")
    bad.write_text(entry("https://h/x.qcow2", "https://h/S") + "mirror = 'x'\n")
    with pytest.raises(ImageError, match=r"unknown key.*'mirror'"):
        load_download("bad")
    bad.write_text('description = "no table"\n')
    with pytest.raises(ImageError, match="missing the \\[download\\] table"):
        load_download("bad")


def test_the_shipped_cloud_images(tmp_path: Path) -> None:
    names = download_names()
    assert {
        "ubuntu-24.04",
        "fedora-41",
        "alpine-3.21",
        "rocky-9",
    } <= set(names)
    assert not set(names) & set(catalog_names())  # never the name of a local build
    for name in names:
        e = load_download(name)
        assert e.url.startswith("https://") and e.checksum_url.startswith("https://"), name
        assert e.checksum in ("sha256", "sha512") and e.format == "qcow2", name
        assert e.url.endswith((".qcow2", ".img")) and e.description, name
        assert e.checksum_url != e.url
        check_spec(name)
        assert load_download_file(e.path) == e
    # Fedora's CHECKSUM is clear-signed: checked with Fedora 41's release key.
    key = load_download("fedora-41").signing_key
    assert key is not None and key.name == "fedora-41.gpg"
    shown = subprocess.run(
        ["gpg", "--homedir", str(tmp_path), "--show-keys", "--with-colons", str(key)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "fpr:::::::::466CF2D8B60BC3057AA9453ED0622462E99D6AD1:" in shown


def test_offline_option_from_command_line_env_and_ini() -> None:
    def ini(values: dict[str, str]):  # type: ignore[no-untyped-def]
        return lambda key: values.get(key)

    assert resolve_settings({}, {}, ini({})).offline is False
    assert resolve_settings({"offline": True}, {}, ini({})).offline is True
    assert resolve_settings({}, {"PYTEST_KVM_OFFLINE": "1"}, ini({})).offline is True
    assert resolve_settings({}, {}, ini({"kvm_offline": "true"})).offline is True
    with pytest.raises(KvmConfigError, match="PYTEST_KVM_OFFLINE"):
        resolve_settings({}, {"PYTEST_KVM_OFFLINE": "sometimes"}, ini({}))


def test_an_https_download_redirected_to_http_is_refused(
    server: ImageServer, qcow2: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    context, cert = tls_context(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # this client trusts the test server
    secure = ImageServer(files={"/" + NAME: qcow2}, tls=context).start()
    try:
        digest = hashlib.sha256(qcow2).hexdigest()
        # Over https, and redirected within https: fine.
        secure.redirects["/moved.qcow2"] = secure.url(NAME)
        image = resolve(f"{secure.url('moved.qcow2')}#sha256={digest}", tmp_path, print)
        assert image.path.read_bytes() == qcow2
        # Redirected to plain http (the image there is the right one, even): refused.
        secure.redirects["/" + NAME] = server.url(NAME)
        with pytest.raises(ImageError, match="from https to plain http"):
            resolve(f"{secure.url(NAME)}#sha256={digest}", tmp_path / "c2", print)
        assert server.requests(NAME) == []  # never asked over http
    finally:
        secure.stop()
    # Plain http to plain http is what it was.
    server.redirects["/old.qcow2"] = server.url(NAME)
    assert resolve(f"{server.url('old.qcow2')}#sha256={digest}", tmp_path / "c3", print)


def test_the_redirect_check() -> None:
    check = download.NoDowngrade()
    https = urllib.request.Request("https://h.example/x.qcow2")
    with pytest.raises(ImageError, match="from https to plain http"):
        check.redirect_request(https, None, 302, "Found", {}, "http://h.example/x.qcow2")
    moved = check.redirect_request(https, None, 301, "Moved", {}, "https://m.example/x.qcow2")
    assert moved is not None and moved.full_url == "https://m.example/x.qcow2"
    plain = urllib.request.Request("http://h.example/x.qcow2")
    assert check.redirect_request(plain, None, 302, "Found", {}, "http://m.example/x")


def test_an_unknown_host_is_not_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    def no_such_host(*args: object, **kwargs: object) -> None:
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_host)  # no lookup leaves the machine
    monkeypatch.setattr(fetching, "RETRY_DELAY", 60.0)  # a retry would hang the test
    with pytest.raises(ImageError, match=r"cannot download .*Name or service not known"):
        resolve("https://h.example/x.qcow2", tmp_path, lambda _: None)


def test_cli_pull_and_list(
    server: ImageServer,
    qcow2: bytes,
    tmp_path: Path,
    catalog: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from pytest_kvm import cli

    server.files["/SUMS"] = f"{hashlib.sha256(qcow2).hexdigest()}  {NAME}\n".encode()
    (catalog / "cloudy-1.toml").write_text(entry(server.url(NAME), server.url("SUMS")))
    cache = str(tmp_path / "cache")
    assert cli.main(["--cache", cache, "image", "list"]) == 0
    assert f"cloudy-1         not cached        -  download {server.url(NAME)}" in (
        capsys.readouterr().out
    )
    assert cli.main(["--cache", cache, "image", "pull", "cloudy-1"]) == 0
    assert cli.main(["--cache", cache, "image", "pull", pinned(server, qcow2)]) == 0
    out = capsys.readouterr().out
    assert "downloaded cloudy-1: 100%" in out and "(qcow2, 16 MiB virtual)" in out
    assert cli.main(["--cache", cache, "image", "list"]) == 0
    out = capsys.readouterr().out
    assert "cloudy-1         cached" in out
    assert f"disk-{parse_url(server.url(NAME)).key[5:]}" in out  # the URL's download
    assert cli.main(["--cache", cache, "image", "pull", "not-there"]) == 2
    assert cli.main(["--cache", cache, "image", "build", "cloudy-1"]) == 2
    assert "is downloaded, not built: pytest-kvm image pull cloudy-1" in capsys.readouterr().err
