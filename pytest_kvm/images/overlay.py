"""qcow2 overlays over a base image: guests write here, never to the base."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from ..errors import ImageError, KvmUnavailable


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


def create_overlay(base: Path, base_format: str, path: Path, size: int | None = None) -> Path:
    """A new qcow2 at ``path`` backed by ``base``; the base is opened read-only."""
    args = ["create", "-q", "-f", "qcow2", "-F", base_format, "-b", str(base.resolve())]
    args += ["-o", "lazy_refcounts=on,cluster_size=65536", "--", str(path)]
    if size:
        args.append(str(size))
    proc = qemu_img(*args)
    if proc.returncode != 0:
        raise ImageError(f"cannot create overlay {str(path)!r}: {_last_line(proc.stderr)}")
    path.chmod(0o600)
    return path


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no error output"
