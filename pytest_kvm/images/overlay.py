"""qcow2 overlays over a base image: guests write here, never to the base."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from ..errors import HostDiskFull, ImageError, KvmUnavailable

# The least free space on the host for a new overlay or blank disk: enough for a
# guest's writes during a test, its serial log and sockets. Both are sparse qcow2
# files, so a blank disk needs no more than an overlay, whatever its virtual size.
MIN_FREE_SPACE = 64 << 20


def qemu_img(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    if shutil.which("qemu-img") is None:
        raise KvmUnavailable("qemu-img is not installed (Debian package: qemu-utils)")
    return subprocess.run(
        ["qemu-img", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def image_info(path: Path) -> dict[str, Any]:
    proc = qemu_img("info", "--output=json", "-U", "--", str(path))
    if proc.returncode != 0:
        raise ImageError(f"image {str(path)!r} cannot be read: {_last_line(proc.stderr)}")
    info: dict[str, Any] = json.loads(proc.stdout)
    return info


def check_free_space(directory: Path, needed: int = MIN_FREE_SPACE, what: str = "a disk") -> None:
    """Raise ``HostDiskFull`` unless ``directory``'s file system has ``needed`` bytes
    free (for the caller: what ``statvfs`` says an unprivileged user may use)."""
    try:
        st = os.statvfs(directory)
    except OSError as exc:
        raise HostDiskFull(f"cannot make {what}: {str(directory)!r}: {exc.strerror}") from None
    free = st.f_bavail * st.f_frsize
    if free < needed:
        raise HostDiskFull(
            f"cannot make {what}: only {free / 2**20:.1f} MiB free in {str(directory)!r}, "
            f"needs at least {needed / 2**20:.0f} MiB; free some space there, or point "
            "PYTEST_KVM_RUNTIME_DIR (guests' disks) or --kvm-cache (templates) elsewhere"
        )


def create_overlay(
    base: Path,
    base_format: str,
    path: Path,
    size: int | None = None,
    secret: Path | None = None,
) -> Path:
    """A new qcow2 at ``path`` backed by ``base``; the base is opened read-only.

    With ``secret`` the overlay is LUKS-encrypted with it, like its encrypted base:
    what a guest writes is never stored in clear. The base is not opened then
    (``-u``; it would need its key too), so ``size`` must be given."""
    check_free_space(path.parent, what=f"overlay {str(path)!r}")
    args = ["create", "-q", "-f", "qcow2", "-F", base_format, "-b", str(base.resolve())]
    opts = "lazy_refcounts=on,cluster_size=65536"
    if secret is not None:
        if not size:
            raise ImageError(f"cannot create encrypted overlay {str(path)!r} without its size")
        args += ["-u", "--object", secret_object(secret)]
        opts += f",encrypt.format=luks,encrypt.key-secret={SECRET_ID}"
    args += ["-o", opts, "--", str(path)]
    if size:
        args.append(str(size))
    proc = _qemu_img_luks(args, path, encrypted=secret is not None)
    if proc.returncode != 0:
        raise ImageError(f"cannot create overlay {str(path)!r}: {_last_line(proc.stderr)}")
    path.chmod(0o600)
    return path


def create_blank_disk(path: Path, size: int) -> Path:
    """An empty qcow2 of ``size`` bytes at ``path``: the disk an installer writes."""
    check_free_space(path.parent, what=f"disk {str(path)!r}")
    args = ["create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=65536",
            "--", str(path), str(size)]  # fmt: skip
    proc = _qemu_img_luks(args, path, encrypted=False)
    if proc.returncode != 0:
        raise ImageError(f"cannot create disk {str(path)!r}: {_last_line(proc.stderr)}")
    path.chmod(0o600)
    return path


def flatten_image(source: Path, dest: Path, timeout: float = 1800) -> Path:
    """A standalone qcow2 copy of ``source`` and its backing chain, written to a
    temporary name next to ``dest`` and renamed into place, so ``dest`` is whole or
    absent."""
    tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}")
    args = ["convert", "-q", "-O", "qcow2", "--", str(source), str(tmp)]
    try:
        proc = _qemu_img_luks(args, tmp, encrypted=False, timeout=timeout)
        if proc.returncode != 0:
            raise ImageError(f"cannot save {str(source)!r}: {_last_line(proc.stderr)}")
        tmp.chmod(0o644)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def encrypt_image(
    source: Path, source_format: str, dest: Path, secret: Path, iter_time_ms: int | None = None
) -> Path:
    """A LUKS-encrypted qcow2 copy of ``source`` at ``dest``, keyed by the ``secret`` file.

    ``iter_time_ms`` is LUKS' key-derivation time (QEMU's default is 2000 ms): every
    open of the image pays it once."""
    opts = f"encrypt.format=luks,encrypt.key-secret={SECRET_ID}"
    if iter_time_ms is not None:
        opts += f",encrypt.iter-time={int(iter_time_ms)}"
    args = ["convert", "-q", "-f", source_format, "-O", "qcow2", "--object",
            secret_object(secret), "-o", opts, "--", str(source), str(dest)]  # fmt: skip
    proc = _qemu_img_luks(args, dest, encrypted=True, timeout=1800)
    if proc.returncode != 0:
        raise ImageError(f"cannot encrypt {str(source)!r}: {_last_line(proc.stderr)}")
    dest.chmod(0o600)
    return dest


_LUKS_ATTEMPTS = 12


def _qemu_img_luks(
    args: list[str], out: Path, encrypted: bool, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``qemu-img`` writing ``out``, retried when it fails in LUKS' key-derivation benchmark.

    QEMU 7.2 times PBKDF2 with the thread's CPU-time clock and gives up ("Unable to get
    accurate CPU usage") when a sample comes back as zero. On these virtual machines
    about one run in four fails that way (measured: 7 of 30); each attempt fails
    within milliseconds and is independent, so a dozen make a failure negligible."""
    proc = qemu_img(*args, timeout=timeout)
    for _ in range(_LUKS_ATTEMPTS - 1 if encrypted else 0):
        if proc.returncode == 0 or "Unable to get accurate CPU usage" not in proc.stderr:
            break
        out.unlink(missing_ok=True)
        proc = qemu_img(*args, timeout=timeout)
    return proc


SECRET_ID = "pytestkvmsec0"  # noqa: S105 (the object's id, not a key)


def secret_object(secret: Path) -> str:
    """The ``--object``/``-object`` value that makes QEMU read the key from ``secret``
    (the file's bytes exactly): the key itself is never on a command line."""
    check_qemu_path(str(secret))
    return f"secret,id={SECRET_ID},file={secret},format=raw"


def key_secret_opts(encrypted: tuple[bool, ...]) -> str:
    """``encrypt.key-secret=`` for every encrypted layer of a chain, top first
    (``backing.`` once per level down): "" for a chain with none."""
    return ",".join(
        "backing." * depth + f"encrypt.key-secret={SECRET_ID}"
        for depth, layer in enumerate(encrypted)
        if layer
    )


def check_qemu_path(path: str) -> None:
    # QEMU's option syntax splits on ',' (',,' escapes it); refuse rather than misparse.
    if "," in path:
        raise ImageError(f"{path!r}: QEMU options cannot take a path with ',' in it")


def encrypted_chain(path: Path) -> tuple[bool, ...]:
    """For each layer of ``path``'s backing chain, top first: is it encrypted?"""
    proc = qemu_img("info", "--output=json", "-U", "--backing-chain", "--", str(path))
    if proc.returncode != 0:
        raise ImageError(f"image {str(path)!r} cannot be read: {_last_line(proc.stderr)}")
    layers = json.loads(proc.stdout)
    flags = tuple(bool(layer.get("encrypted")) for layer in layers)
    return flags if any(flags) else ()


def check_secret(path: Path, encrypted: tuple[bool, ...], secret: Path) -> str:
    """ "" if ``secret`` unlocks every encrypted layer of ``path``, else why not.

    One read through qemu-io: it costs one key derivation per layer (the image's
    LUKS iteration time, about 2 s by default)."""
    check_qemu_path(str(path))
    opts = f"driver=qcow2,file.filename={path},{key_secret_opts(encrypted)}"
    try:
        proc = subprocess.run(
            ["qemu-io", "--object", secret_object(secret), "--image-opts", "-r", opts,
             "-c", "read 0 512"],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
    except FileNotFoundError:
        raise KvmUnavailable("qemu-io is not installed (Debian package: qemu-utils)") from None
    if proc.returncode == 0 and "read 512/512" in proc.stdout:
        return ""
    return _last_line(proc.stderr or proc.stdout)


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no error output"
