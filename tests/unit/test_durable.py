"""What is renamed into the cache is on disk first: downloads, customisation layers and
kernel boot files go through ``rename_synced`` (the one fsync helper, also used for
built images and templates). The real helper runs; a spy records what it synced."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_kvm import util
from pytest_kvm.images import Image, download
from pytest_kvm.util import rename_synced
from tests.support.images import qcow2_bytes
from tests.support.imageserver import ImageServer

Synced = list[tuple[Path, bool]]  # (path, whether it existed when it was synced)


@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> Synced:
    calls: Synced = []
    real = util.fsync_path

    def spy(path: Path) -> None:
        calls.append((Path(path), Path(path).exists()))
        real(path)

    monkeypatch.setattr(util, "fsync_path", spy)
    monkeypatch.setattr(download, "fsync_path", spy)
    return calls


def test_rename_synced_syncs_the_data_before_and_the_directory_after(
    tmp_path: Path, synced: Synced
) -> None:
    (tmp_path / "a").write_bytes(b"data")
    rename_synced(tmp_path / "a", tmp_path / "sub-b")
    assert synced == [(tmp_path / "a", True), (tmp_path, True)]
    assert (tmp_path / "sub-b").read_bytes() == b"data"
    synced.clear()
    work = tmp_path / "work"
    work.mkdir()
    (work / "f").write_text("x")
    rename_synced(work, tmp_path / "done")
    assert synced == [(work / "f", True), (work, True), (tmp_path, True)]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ImageServer]:
    srv = ImageServer(files={"/disk.qcow2": qcow2_bytes(tmp_path / "disk.qcow2")}).start()
    try:
        yield srv
    finally:
        srv.stop()


def test_a_download_is_synced_before_and_after_its_rename(
    server: ImageServer, tmp_path: Path, synced: Synced
) -> None:
    from pytest_kvm.images.store import resolve

    data = server.files["/disk.qcow2"]
    assert isinstance(data, bytes)
    spec = f"{server.url('disk.qcow2')}#sha256={hashlib.sha256(data).hexdigest()}"
    path = resolve(spec, tmp_path / "cache", lambda _: None).path
    parts = [i for i, (p, existed) in enumerate(synced) if p.name == "disk.qcow2.part" and existed]
    assert parts, synced  # its data, under its temporary name
    assert parts[0] < synced.index((path.parent, True))  # then the rename


def test_a_customisation_layer_is_synced_before_its_rename(
    tmp_path: Path, synced: Synced, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pytest_kvm import customize

    class NoAppliance:  # libguestfs itself is not what this test is about
        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        def __enter__(self) -> NoAppliance:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def apply(self, custom: object) -> None:
            pass

    monkeypatch.setattr(customize.layers, "DiskHandle", NoAppliance)
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M"], check=True)
    image = Image("base", base, "qcow2", str(base), 16 << 20)
    custom = customize.Customization.build(hostname="web")
    layer = customize.customized_image(image, custom, tmp_path, force_tcg=True, progress=print)
    (work, existed), after = synced
    assert work.name.startswith(f".{layer.path.name}.building-") and existed  # its data
    assert after == (layer.path.parent, True)  # then the rename


class FakeGuestFS:
    """The calls kernel.py makes, on an "image" with one GRUB entry."""

    def __init__(self, **kwargs: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Any:  # set_backend_settings, launch, shutdown ...
        return lambda *args, **kwargs: None

    def inspect_os(self) -> list[str]:
        return ["/dev/sda1"]

    def inspect_get_mountpoints(self, root: str) -> dict[str, str]:
        return {"/": root}

    def is_file(self, path: str, followsymlinks: bool = False) -> bool:
        return path in ("/boot/grub/grub.cfg", "/boot/vmlinuz", "/boot/initrd.img")

    def cat(self, path: str) -> str:
        return "linux /boot/vmlinuz root=/dev/sda1 ro\ninitrd /boot/initrd.img\n"

    def realpath(self, path: str) -> str:
        return path

    def download(self, src: str, dst: str) -> None:
        Path(dst).write_bytes(b"contents of " + src.encode())


def test_kernel_boot_files_are_synced_before_their_rename(
    tmp_path: Path, synced: Synced, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pytest_kvm.images.kernel import boot_files

    monkeypatch.setitem(sys.modules, "guestfs", types.SimpleNamespace(GuestFS=FakeGuestFS))
    base = tmp_path / "base.qcow2"
    base.write_bytes(b"\0" * 4096)
    files = boot_files(Image("base", base, "raw", str(base)), tmp_path, True, lambda _: None)
    assert files.kernel.read_bytes() == b"contents of /boot/vmlinuz"
    work = [p for p, _ in synced if p.name.startswith(f".{files.kernel.parent.name}.tmp-")]
    assert work, synced  # the directory, synced under its temporary name ...
    names = {p.name for p, _ in synced if p.parent == work[0]}
    assert names == {"vmlinuz", "initrd.img", "meta.json"}  # ... with every file in it
    assert synced[-1] == (tmp_path / "kernels", True)  # and the rename, after
