"""Templates as a build leaves them, without booting a guest (qemu-img makes the disk)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from pytest_kvm.images import Image
from pytest_kvm.ssh import KeyPair
from pytest_kvm.template import Shape, TemplateStore

KEY = "0123456789abcdef"


def base_image(directory: Path) -> Image:
    """A blank 64 MiB qcow2 image to make templates of."""
    path = directory / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True)
    return Image("base", path, "qcow2", str(path))


def make_template(
    root: Path, image: Image, name: str = "t", key: str = KEY, extra: dict | None = None
) -> Path:
    """The files a template build leaves, with its meta.json, in a finished directory."""
    work = root / name
    work.mkdir(parents=True)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image.path), "-F", "qcow2",
         str(work / "disk.qcow2")],
        check=True,
    )  # fmt: skip
    (work / "ram").write_bytes(b"\0" * 4096)
    (work / "state").write_bytes(os.urandom(2048))
    (work / "seed.iso").write_bytes(b"seed")
    (work / "serial.log").write_text("boot\n")
    KeyPair.generate().save(work / "id_ed25519")
    KeyPair.generate().save(work / "host_ed25519")
    TemplateStore._write_meta(
        work, key, image, Shape(1024, 2), "02:6b:76:00:00:01", True, extra=extra
    )
    return work
