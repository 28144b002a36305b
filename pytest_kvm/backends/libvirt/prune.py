"""Pruning a pool: the copies of templates' disks (``disk-<sha20>.up-...qcow2``) and
save images (``state-<sha20>.up-...save``) that no template of the cache has any more
and nothing in the pool or on the host uses.

What runs killed on this machine left (their guests' volumes, their half-made
uploads) goes first, by ``reap_orphan_volumes``. Of the complete copies, one is kept
(keep when unsure) while any of these holds:

- a template of the cache still has that disk or state (by its checksum);
- it was uploaded from another host, whose caches this one cannot see;
- a defined or running domain names it, directly or in its disks' backing chains;
- another volume that stays in the pool is backed by it (a guest's overlay).

Only names of that exact form are ever deleted; anything else in the pool is not ours
to judge. Half-made uploads that stay are reported as in use: their uploader lives,
or it is on another host.
"""

from __future__ import annotations

import contextlib
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ...errors import KvmError
from .connection import connect, first_line, load_libvirt
from .storage import HOST_TAG, UPLOAD_NAME, reap_orphan_volumes, refresh_pool

# A complete upload of a template's state or disk: kind, checksum, uploader's host, pid.
TEMPLATE_COPY = re.compile(
    r"^(state(?=.*\.save$)|disk(?=.*\.qcow2$))-([0-9a-f]{20})\.up-h([0-9a-f]{6})\.p(\d+)"
    r"\.[0-9a-f]+\.(save|qcow2)$"
)


@dataclass(frozen=True)
class PoolVolume:
    """A volume as pruning sees it: its name, path and backing file ("" if none)."""

    name: str
    path: str
    backing: str = ""


@dataclass
class PoolPruned:
    """Volumes removed from a pool and kept in it: (name, why) each."""

    removed: list[tuple[str, str]] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)


def copy_key(name: str) -> str:
    """``state-<sha20>`` or ``disk-<sha20>`` for a template copy's volume name, else ""."""
    match = TEMPLATE_COPY.match(name)
    return f"{match.group(1)}-{match.group(2)}" if match else ""


def select_stale(
    volumes: Iterable[PoolVolume],
    domains: Mapping[str, str],
    templates: Mapping[str, str],
    host_tag: str = HOST_TAG,
) -> PoolPruned:
    """Which complete template copies among ``volumes`` may go (``removed``) and which
    stay because something uses them (``kept``), without touching anything.

    ``domains`` maps each path a domain's disks name (backing chains too) to the
    domain; ``templates`` maps ``copy_key``s that templates of the cache have to the
    template's name."""
    volumes = list(volumes)
    names = {vol.name for vol in volumes}
    result = PoolPruned()
    stale: dict[str, str] = {}  # path -> name: candidates nothing named so far keeps
    for vol in volumes:
        match = TEMPLATE_COPY.match(vol.name)
        if match is None:
            continue
        if f"{vol.name}.ok" not in names:
            continue  # a half-made upload: half_uploads says why it stays
        key = copy_key(vol.name)
        if key in templates:
            result.kept.append((vol.name, f"template {templates[key]} in the cache uses it"))
        elif match.group(3) != host_tag:
            why = f"uploaded from another host (h{match.group(3)}), whose caches are not seen here"
            result.kept.append((vol.name, why))
        else:
            stale[vol.path] = vol.name
    users = _users(volumes, domains, set(stale))
    for path, name in stale.items():
        if path in users:
            result.kept.append((name, f"in use: {users[path]}"))
        else:
            why = "state" if name.startswith("state-") else "disk"
            result.removed.append(
                (name, f"no template in the cache has this {why} and nothing uses it")
            )
    return result


def _users(
    volumes: list[PoolVolume], domains: Mapping[str, str], stale: set[str]
) -> dict[str, str]:
    """Path -> who uses it: the paths domains name, and the backing chains of those
    and of every volume that stays (not in ``stale``), followed to their ends."""
    by_path = {vol.path: vol for vol in volumes}
    users: dict[str, str] = {path: f"domain {name}" for path, name in domains.items()}
    todo = [vol for vol in volumes if vol.path not in stale and not vol.name.endswith(".ok")]
    todo += [by_path[path] for path in domains if path in by_path]
    while todo:
        vol = todo.pop()
        if vol.backing and vol.backing not in users:
            users[vol.backing] = f"volume {vol.name} is backed by it"
            if vol.backing in by_path:
                todo.append(by_path[vol.backing])
    return users


def half_uploads(volumes: Iterable[PoolVolume]) -> list[tuple[str, str]]:
    """Uploads without their ``.ok`` marker that stay (after ``reap_orphan_volumes``):
    their uploader still runs, or runs on another host. (name, why) each."""
    volumes = list(volumes)
    names = {vol.name for vol in volumes}
    found = []
    for vol in volumes:
        match = UPLOAD_NAME.match(vol.name)
        if match is None or f"{vol.name}.ok" in names:
            continue
        if match.group(1) == HOST_TAG:
            found.append((vol.name, f"being uploaded by process {match.group(2)}"))
        else:
            found.append((vol.name, f"being uploaded from another host (h{match.group(1)})"))
    return found


def domain_paths(conn: Any, pools: Mapping[str, str]) -> dict[str, str]:
    """Path -> domain, for every disk source (and backing store) of every defined or
    running domain of ``conn``. ``pools`` maps each pool's name to its target path, for
    sources given as pool and volume."""
    libvirt, _ = load_libvirt()
    found: dict[str, str] = {}
    for dom in conn.listAllDomains(0):
        try:
            xml = dom.XMLDesc(0)
            name = dom.name()
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                continue  # gone meanwhile
            raise  # what it uses is unknown: prune nothing
        for path in disk_paths(xml, pools):
            found.setdefault(path, name)
    return found


def disk_paths(xml: str, pools: Mapping[str, str]) -> list[str]:
    """The files a domain's XML names for its disks: sources and backing stores."""
    root = ET.fromstring(xml)  # noqa: S314 (libvirtd's own output of a parsed domain)
    paths = []
    for source in root.findall("devices/disk//source"):
        if source.get("file"):
            paths.append(str(source.get("file")))
        pool, volume = source.get("pool"), source.get("volume")
        if pool is not None and pool in pools and volume:
            paths.append(f"{pools[pool]}/{volume}")
    return paths


def pool_volumes(pool: Any) -> list[PoolVolume]:
    """The pool's volumes with their paths and backing files."""
    libvirt, _ = load_libvirt()
    found = []
    for vol in pool.listAllVolumes(0):
        try:
            root = ET.fromstring(vol.XMLDesc(0))  # noqa: S314 (libvirtd's own output)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_VOL:
                continue  # deleted meanwhile
            raise  # what it is backed by is unknown: prune nothing
        path = root.findtext("target/path") or vol.path()
        found.append(PoolVolume(vol.name(), path, root.findtext("backingStore/path") or ""))
    return found


def pool_targets(conn: Any) -> dict[str, str]:
    """Each pool's name -> its target directory."""
    libvirt, _ = load_libvirt()
    targets = {}
    for pool in conn.listAllStoragePools(0):
        with contextlib.suppress(libvirt.libvirtError, ET.ParseError):
            path = ET.fromstring(pool.XMLDesc(0)).findtext("target/path")  # noqa: S314
            if path:
                targets[pool.name()] = path.rstrip("/")
    return targets


def prune_pool(conn: Any, pool: Any, templates: Callable[[], Mapping[str, str]]) -> PoolPruned:
    """Delete the stale template copies of ``pool`` (see the module's doc) and what
    runs killed on this machine left there. ``templates()`` gives the ``copy_key`` ->
    template map of the cache; it is read after the pool is listed, so a template
    made meanwhile (before its first clone uploads it) is always seen."""
    result = PoolPruned()
    for name in reap_orphan_volumes(pool):
        result.removed.append((name, "left by a run on this machine that is gone"))
    volumes = pool_volumes(pool)
    chosen = select_stale(volumes, domain_paths(conn, pool_targets(conn)), templates())
    result.kept += chosen.kept + half_uploads(volumes)
    for name, why in chosen.removed:
        problem = _delete(pool, name)
        if problem:
            result.kept.append((name, f"could not be deleted: {problem}"))
        else:
            result.removed.append((name, why))
    return result


def _delete(pool: Any, name: str) -> str:
    """Delete a complete upload: its marker first (nobody picks it up from then on),
    then the volume. Why it failed, or ""."""
    libvirt, _ = load_libvirt()
    try:
        for victim in (f"{name}.ok", name):
            pool.storageVolLookupByName(victim).delete(0)
    except libvirt.libvirtError as exc:
        return first_line(exc)
    return ""


def prune_uri(uri: str, pool_name: str, templates: Callable[[], Mapping[str, str]]) -> PoolPruned:
    """``prune_pool`` on pool ``pool_name`` of ``uri`` (never made here). A KvmError
    (KvmConfigError, KvmUnavailable) saying why when libvirt cannot be reached there,
    has no such pool started, or fails on the way: then nothing more is deleted."""
    libvirt, _ = load_libvirt()
    conn = connect(uri)
    try:
        pool = conn.storagePoolLookupByName(pool_name)
    except libvirt.libvirtError:
        raise KvmError(f"{uri} has no storage pool {pool_name!r}: nothing to prune") from None
    try:
        if not pool.isActive():
            raise KvmError(f"storage pool {pool_name!r} at {uri} is not started")
        refresh_pool(pool, wait=30.0)
        return prune_pool(conn, pool, templates)
    except libvirt.libvirtError as exc:  # the daemon went away, say
        raise KvmError(f"--kvm-uri {uri}: {first_line(exc)}") from None
