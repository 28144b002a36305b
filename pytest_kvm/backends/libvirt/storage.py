"""libvirt storage: the pool (ours made when missing), guests' volumes named by
their owner, images uploaded once per host and checksum (complete only with their
marker volume), remembered checksums, and what killed runs left."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
import time
import urllib.parse
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from filelock import FileLock

from ...errors import ImageError, KvmConfigError
from ...images.overlay import image_info, qemu_img
from ...network import pid_alive
from ...private import private_dir, read_regular, write_private
from .connection import first_line, is_remote, load_libvirt

DEFAULT_POOL = "pytest-kvm"


def storage_pool(conn: Any, uri: str, name: str) -> Any:
    """The pool named ``name``, started. Our own default pool is created when missing;
    any other missing pool is an error naming the URI."""
    libvirt, _ = load_libvirt()
    try:
        pool = conn.storagePoolLookupByName(name)
    except libvirt.libvirtError:
        if name != DEFAULT_POOL:
            known = ", ".join(sorted(conn.listStoragePools() + conn.listDefinedStoragePools()))
            raise KvmConfigError(
                f"--kvm-uri {uri}: storage pool {name!r} does not exist "
                f"(pools there: {known or 'none'}); create it or leave --kvm-pool unset"
            ) from None
        pool = _define_default_pool(conn, uri)
    try:
        if not pool.isActive():
            pool.create(0)
        refresh_pool(pool)
    except libvirt.libvirtError as exc:
        raise KvmConfigError(
            f"--kvm-uri {uri}: storage pool {name!r} cannot be started: {first_line(exc)}"
        ) from None
    return pool


def refresh_pool(pool: Any, wait: float = 120.0) -> None:
    """Re-read the pool's directory. libvirt refuses while any volume of it is being
    uploaded ("has asynchronous jobs running": another worker's overlay): wait for
    that, a refresh only syncs what libvirt knows with the directory."""
    libvirt, _ = load_libvirt()
    deadline = time.monotonic() + wait
    while True:
        try:
            pool.refresh(0)
            return
        except libvirt.libvirtError as exc:
            if "asynchronous jobs" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(0.25)


def _define_default_pool(conn: Any, uri: str) -> Any:
    libvirt, _ = load_libvirt()
    if urllib.parse.urlsplit(uri).path.rstrip("/") == "/session":
        if is_remote(uri):
            raise KvmConfigError(
                f"--kvm-uri {uri}: name a storage pool of that session with --kvm-pool"
            )
        target = Path.home() / ".local/share/libvirt/images" / DEFAULT_POOL
    else:
        target = Path("/var/lib/libvirt/images") / DEFAULT_POOL
    xml = (
        f"<pool type='dir'><name>{DEFAULT_POOL}</name><target><path>{target}</path>"
        "<permissions><mode>0711</mode></permissions></target></pool>"
    )
    try:
        pool = conn.storagePoolDefineXML(xml, 0)
        pool.build(0)
        pool.setAutostart(True)
    except libvirt.libvirtError as exc:
        with contextlib.suppress(libvirt.libvirtError):  # another worker made it
            return conn.storagePoolLookupByName(DEFAULT_POOL)
        raise KvmConfigError(
            f"--kvm-uri {uri}: cannot create storage pool {DEFAULT_POOL!r} at {target}: "
            f"{first_line(exc)}"
        ) from None
    return pool


def _sums_dir() -> Path | None:
    """The user's private dir of remembered checksums; None (said on stderr) if the
    one in /tmp is not private to this user: it is then not used."""
    path = Path(tempfile.gettempdir()) / f"pytest-kvm-sums-{os.getuid()}"
    try:
        return private_dir(path, "checksum directory")
    except KvmConfigError as exc:
        print(f"pytest-kvm: {exc}; checksums are not remembered", file=sys.stderr)
        return None


def file_sha256(path: Path) -> str:
    """The file's sha256, remembered in a private dir by (path, size, mtime)."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    memos = _sums_dir()
    memo = memos / key.hexdigest()[:32] if memos is not None else None
    if memo is not None:
        with contextlib.suppress(OSError, ValueError):  # none yet, or not ours to trust
            value = read_regular(memo, 64).decode()
            if re.fullmatch("[0-9a-f]{64}", value):
                return value
    digest = hashlib.sha256()
    with path.open("rb") as src:
        while chunk := src.read(1 << 20):
            digest.update(chunk)
    value = digest.hexdigest()
    if memo is not None:
        with contextlib.suppress(OSError):
            write_private(memo, value)
    return value


def send_file(conn: Any, vol: Any, path: Path) -> None:
    stream = conn.newStream(0)
    size = path.stat().st_size
    vol.upload(stream, 0, size, 0)
    try:
        with path.open("rb") as src:
            stream.sendAll(lambda _stream, nbytes, _src: _src.read(nbytes), src)
        stream.finish()
    except BaseException:
        with contextlib.suppress(Exception):
            stream.abort()
        raise


def volume_xml(
    name: str,
    capacity: int,
    fmt: str,
    backing: str | None = None,
    backing_format: str = "qcow2",
) -> str:
    root = ET.Element("volume")
    ET.SubElement(root, "name").text = name
    ET.SubElement(root, "capacity").text = str(capacity)
    target = ET.SubElement(root, "target")
    ET.SubElement(target, "format", type=fmt)
    perms = ET.SubElement(target, "permissions")
    ET.SubElement(perms, "mode").text = "0600"
    if backing is not None:
        store = ET.SubElement(root, "backingStore")
        ET.SubElement(store, "path").text = backing
        ET.SubElement(store, "format", type=backing_format)
    return ET.tostring(root, encoding="unicode")


def lookup(pool: Any, name: str) -> Any | None:
    libvirt, _ = load_libvirt()
    try:
        return pool.storageVolLookupByName(name)
    except libvirt.libvirtError:
        return None


def upload_image(conn: Any, pool: Any, path: Path, lock_dir: Path) -> Any:
    """The pool's volume holding the image at ``path`` (flattened if it has a backing
    chain), uploaded once per host and checksum.

    Every upload goes into a volume of its own (``NAME.up-h<host>.p<pid>.<token>``)
    and is complete only once its marker volume (the same name + ``.ok``) exists,
    which is made after the last byte is in: whoever uploads, from whatever cache or
    host, nobody uses or deletes another's upload before that. Parallel workers of
    this machine upload it once (a file lock); a run on another cache or host that
    finds none complete uploads its own."""
    libvirt, _ = load_libvirt()
    info = image_info(path)
    backing = info.get("full-backing-filename") or info.get("backing-filename")
    # A template's disk (an overlay on an image) goes up as a layer on the image's
    # volume: clones' overlays are backed by it. Other chains are flattened.
    layer = None
    if backing and info.get("format") == "qcow2" and info.get("backing-filename-format") == "qcow2":
        layer = upload_image(conn, pool, Path(backing), lock_dir)
    flatten = (bool(backing) and layer is None) or info.get("format") != "qcow2"
    prefix = f"{path.stem[:40]}-{file_sha256(path)[:20]}"
    host = hashlib.sha256(conn.getURI().encode()).hexdigest()[:12]
    lock_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock_dir / f"upload-{host}-{prefix}.lock")):
        refresh_pool(pool)
        done = complete_upload(pool, prefix)
        if done is not None:
            return done
        name = f"{prefix}.up-h{HOST_TAG}.p{os.getpid()}.{secrets.token_hex(4)}.qcow2"
        source = path
        tmpdir: Path | None = None
        vol = None
        try:
            if flatten:
                tmpdir = Path(tempfile.mkdtemp(prefix="pytest-kvm-flat-", dir=lock_dir))
                source = tmpdir / "flat.qcow2"
                proc = qemu_img("convert", "-O", "qcow2", "--", str(path), str(source),
                                timeout=1800)  # fmt: skip
                if proc.returncode != 0:
                    raise ImageError(f"cannot flatten {str(path)!r}: {proc.stderr.strip()}")
            if layer is not None:
                tmpdir = Path(tempfile.mkdtemp(prefix="pytest-kvm-layer-", dir=lock_dir))
                source = tmpdir / "layer.qcow2"
                shutil.copyfile(path, source)
                proc = qemu_img("rebase", "-u", "-F", "qcow2", "-b", layer.path(), "--",
                                str(source))  # fmt: skip
                if proc.returncode != 0:
                    raise ImageError(f"cannot rebase {str(path)!r}: {proc.stderr.strip()}")
            vol = pool.createXML(
                volume_xml(name, source.stat().st_size, "qcow2",
                           layer.path() if layer is not None else None), 0
            )  # fmt: skip
            send_file(conn, vol, source)
            pool.createXML(volume_xml(name + ".ok", 0, "raw"), 0)  # now complete
        except BaseException:
            if vol is not None:  # ours, never used: gone
                with contextlib.suppress(libvirt.libvirtError):
                    vol.delete(0)
            raise
        finally:
            if tmpdir is not None:
                shutil.rmtree(tmpdir, ignore_errors=True)
        return pool.storageVolLookupByName(name)


def upload_state(conn: Any, pool: Any, path: Path, lock_dir: Path) -> Any:
    """The pool's volume holding a template's saved state (a libvirt save image), as
    ``upload_image`` does for images: once per host and checksum, complete with its
    ``.ok`` marker. Clones restore from copies of it (``clone_state``)."""
    libvirt, _ = load_libvirt()
    prefix = f"state-{file_sha256(path)[:20]}"
    host = hashlib.sha256(conn.getURI().encode()).hexdigest()[:12]
    lock_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock_dir / f"upload-{host}-{prefix}.lock")):
        refresh_pool(pool)
        done = complete_upload(pool, prefix, ".save")
        if done is not None:
            return done
        name = f"{prefix}.up-h{HOST_TAG}.p{os.getpid()}.{secrets.token_hex(4)}.save"
        vol = None
        try:
            vol = pool.createXML(volume_xml(name, path.stat().st_size, "raw"), 0)
            send_file(conn, vol, path)
            pool.createXML(volume_xml(name + ".ok", 0, "raw"), 0)
        except BaseException:
            if vol is not None:
                with contextlib.suppress(libvirt.libvirtError):
                    vol.delete(0)
            raise
        return pool.storageVolLookupByName(name)


def clone_state(
    conn: Any, pool: Any, state: Any, name: str, patches: list[tuple[int, bytes]]
) -> Any:
    """A copy of the saved-state volume ``state`` named ``name``, made where the pool
    is, with each (offset, bytes) of ``patches`` written over it (the clone's header
    and XML at 0, its MAC in slirp's DHCP table)."""
    vol = pool.createXMLFrom(volume_xml(name, state.info()[1], "raw"), state, 0)
    try:
        for offset, data in patches:
            stream = conn.newStream(0)
            vol.upload(stream, offset, len(data), 0)
            try:
                stream.send(data)
                stream.finish()
            except BaseException:
                with contextlib.suppress(Exception):
                    stream.abort()
                raise
    except BaseException:
        with contextlib.suppress(Exception):
            vol.delete(0)
        raise
    return vol


def complete_upload(pool: Any, prefix: str, suffix: str = ".qcow2") -> Any | None:
    """A complete upload of the image named ``prefix`` (name + checksum) in ``pool``:
    a volume whose ``.ok`` marker exists (the first by name), else None."""
    names = {vol.name() for vol in pool.listAllVolumes(0)}
    for name in sorted(names):
        ours = name == f"{prefix}{suffix}" or (name.startswith(f"{prefix}.up-") and
                                               name.endswith(suffix))  # fmt: skip
        if ours and f"{name}.ok" in names:
            found = lookup(pool, name)
            if found is not None:
                return found
    return None


HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]

_VOLUME = re.compile(r"^pytest-kvm-.+\.h([0-9a-f]{6})\.p(\d+)\.\d+\.[a-z0-9]+$")

# A template's disk or save image uploaded by one host and process (prune.py reads it too).
UPLOAD_NAME = re.compile(r"^.+-[0-9a-f]{20}\.up-h([0-9a-f]{6})\.p(\d+)\.[0-9a-f]+\.(qcow2|save)$")

_reaped: set[str] = set()


def volume_name(domain_name: str, index: int, fmt: str) -> str:
    """A guest's volume: its domain, this machine and process, the drive's index. The
    owner in the name lets a later run on this machine remove what a killed run left."""
    return f"{domain_name}.h{HOST_TAG}.p{os.getpid()}.{index}.{fmt}"


def reap_orphan_volumes(pool: Any) -> list[str]:
    """Delete guest volumes in ``pool`` left by runs of this machine whose process is
    gone (their domains died with their connections), and their image uploads that
    never completed (no ``.ok`` marker). Once per pool and process; returns the
    names deleted."""
    libvirt, _ = load_libvirt()
    key = f"{pool.connect().getURI()}#{pool.name()}"
    if key in _reaped:
        return []
    _reaped.add(key)
    gone = []
    volumes = pool.listAllVolumes(0)
    names = {vol.name() for vol in volumes}
    for vol in volumes:
        match = _VOLUME.match(vol.name()) or UPLOAD_NAME.match(vol.name())
        if match is None or match.group(1) != HOST_TAG or pid_alive(int(match.group(2))):
            continue
        if f"{vol.name()}.ok" in names:  # a complete upload: the image others use
            continue
        with contextlib.suppress(libvirt.libvirtError):
            vol.delete(0)
            gone.append(vol.name())
    return gone
