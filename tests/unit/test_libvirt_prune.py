"""Which copies of templates in a libvirt pool ``template prune`` removes, and which it
keeps and why: the selection on plain values, and the deletion on a fake pool."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest

from pytest_kvm.backends.libvirt import prune
from pytest_kvm.backends.libvirt.prune import PoolVolume, copy_key, disk_paths, select_stale
from pytest_kvm.backends.libvirt.storage import HOST_TAG

POOL = "/pool"
SHA = {name: (name * 20)[:20] for name in "abcdef"}
OTHER_HOST = "0" * 6 if HOST_TAG != "0" * 6 else "1" * 6


def copy(kind: str, sha: str, pid: int = 10, host: str = HOST_TAG) -> str:
    ext = "save" if kind == "state" else "qcow2"
    return f"{kind}-{SHA[sha]}.up-h{host}.p{pid}.0a0b0c0d.{ext}"


def vols(*specs: str | tuple[str, str], complete: bool = True) -> list[PoolVolume]:
    """Volumes (name, or (name, backing name)), each with its .ok marker if complete."""
    found = []
    for spec in specs:
        name, backing = spec if isinstance(spec, tuple) else (spec, "")
        found.append(PoolVolume(name, f"{POOL}/{name}", f"{POOL}/{backing}" if backing else ""))
        if complete:
            found.append(PoolVolume(f"{name}.ok", f"{POOL}/{name}.ok"))
    return found


def test_names_of_template_copies_only() -> None:
    assert copy_key(copy("state", "a")) == f"state-{SHA['a']}"
    assert copy_key(copy("disk", "b")) == f"disk-{SHA['b']}"
    # A base image's upload, a marker, a state with a disk's suffix, a guest's volume.
    for name in (
        f"debian-12-{SHA['a']}.up-h{HOST_TAG}.p1.0a0b0c0d.qcow2",
        copy("state", "a") + ".ok",
        copy("state", "a").replace(".save", ".qcow2"),
        f"pytest-kvm-x.h{HOST_TAG}.p1.0.qcow2",
    ):
        assert copy_key(name) == ""


def test_stale_copies_go_and_used_ones_stay_with_the_reason() -> None:
    state_used, state_stale = copy("state", "a"), copy("state", "b")
    disk_used, disk_stale, disk_domain = copy("disk", "c"), copy("disk", "d"), copy("disk", "e")
    foreign = copy("state", "f", host=OTHER_HOST)
    base = f"debian-12-{SHA['a']}.up-h{HOST_TAG}.p1.0a0b0c0d.qcow2"
    volumes = vols(state_used, state_stale, (disk_used, base), (disk_stale, base), disk_domain,
                   foreign, base)  # fmt: skip
    templates = {copy_key(state_used): "t1", copy_key(disk_used): "t1"}
    domains = {f"{POOL}/{disk_domain}": "vm1"}
    result = select_stale(volumes, domains, templates)
    assert sorted(name for name, _ in result.removed) == sorted([state_stale, disk_stale])
    kept = dict(result.kept)
    assert kept == {
        state_used: "template t1 in the cache uses it",
        disk_used: "template t1 in the cache uses it",
        disk_domain: "in use: domain vm1",
        foreign: f"uploaded from another host (h{OTHER_HOST}), whose caches are not seen here",
    }
    assert dict(result.removed)[state_stale] == (
        "no template in the cache has this state and nothing uses it"
    )


def test_a_copy_in_a_backing_chain_stays_with_the_chain() -> None:
    """A live guest's overlay (a volume of its own) is backed by a template's disk
    copy, which a snapshot's disk copy may be backed by in turn: all of that stays.
    A stale snapshot layer over a stale disk: both go."""
    layer, under = copy("disk", "a"), copy("disk", "b")
    overlay = f"pytest-kvm-r-gw0-01.h{HOST_TAG}.p99.0.qcow2"
    lone_layer, lone_under = copy("disk", "c"), copy("disk", "d")
    volumes = vols((layer, under), under, (lone_layer, lone_under), lone_under)
    volumes += vols((overlay, layer), complete=False)
    result = select_stale(volumes, {}, {})
    assert dict(result.kept) == {
        layer: f"in use: volume {overlay} is backed by it",
        under: f"in use: volume {layer} is backed by it",
    }
    assert sorted(name for name, _ in result.removed) == sorted([lone_layer, lone_under])
    # A domain naming the layer in its disk's backing chain keeps the chain too.
    result = select_stale(volumes[:-1], {f"{POOL}/{layer}": "vm"}, {})
    assert dict(result.kept) == {layer: "in use: domain vm",
                                 under: f"in use: volume {layer} is backed by it"}  # fmt: skip


def test_half_made_uploads_are_never_selected_and_say_why_they_stay() -> None:
    live, foreign = copy("state", "a", pid=123), copy("disk", "b", host=OTHER_HOST)
    volumes = vols(live, foreign, complete=False)
    assert select_stale(volumes, {}, {}).removed == []
    assert dict(prune.half_uploads(volumes)) == {
        live: "being uploaded by process 123",
        foreign: f"being uploaded from another host (h{OTHER_HOST})",
    }


def test_domain_xml_disks_sources_and_backing_stores() -> None:
    xml = """<domain><name>vm</name><devices>
      <disk type='volume'><source pool='p' volume='v1'/></disk>
      <disk type='volume'><source pool='elsewhere' volume='v2'/></disk>
      <disk type='file'><source file='/pool/o.qcow2'/>
        <backingStore type='file'><source file='/pool/disk-x.qcow2'/>
          <backingStore type='file'><source file='/pool/base.qcow2'/></backingStore>
        </backingStore></disk>
      <interface type='network'><source network='default'/></interface>
    </devices></domain>"""
    assert disk_paths(xml, {"p": "/pool"}) == [
        "/pool/v1", "/pool/o.qcow2", "/pool/disk-x.qcow2", "/pool/base.qcow2"
    ]  # fmt: skip


class _Vol:
    def __init__(self, pool: _Pool, spec: PoolVolume) -> None:
        self.pool, self.spec = pool, spec

    def name(self) -> str:
        return self.spec.name

    def path(self) -> str:
        return self.spec.path

    def XMLDesc(self, flags: int) -> str:
        backing = f"<backingStore><path>{self.spec.backing}</path></backingStore>"
        return (
            f"<volume><name>{self.spec.name}</name><target><path>{self.spec.path}</path>"
            f"</target>{backing if self.spec.backing else ''}</volume>"
        )

    def delete(self, flags: int) -> None:
        self.pool.log.append(self.spec.name)
        del self.pool.vols[self.spec.name]


class _Pool:
    def __init__(self, libvirt, volumes: list[PoolVolume]) -> None:
        self.libvirt = libvirt
        self.vols = {vol.name: _Vol(self, vol) for vol in volumes}
        self.log: list[str] = []

    def listAllVolumes(self, flags: int) -> list[_Vol]:
        return list(self.vols.values())

    def storageVolLookupByName(self, name: str) -> _Vol:
        if name not in self.vols:
            raise self.libvirt.libvirtError(f"no storage vol with matching name '{name}'")
        return self.vols[name]

    def name(self) -> str:
        return "pytest-kvm"

    def connect(self) -> _Conn:
        return _Conn([])

    def XMLDesc(self, flags: int) -> str:
        return f"<pool><name>pytest-kvm</name><target><path>{POOL}</path></target></pool>"


class _Dom:
    def __init__(self, name: str, xml: str) -> None:
        self._name, self.xml = name, xml

    def name(self) -> str:
        return self._name

    def XMLDesc(self, flags: int) -> str:
        return self.xml


class _Conn:
    def __init__(self, domains: list[_Dom], pool: _Pool | None = None) -> None:
        self.domains, self.pool = domains, pool

    def getURI(self) -> str:
        return "test:///fake"

    def listAllDomains(self, flags: int) -> list[_Dom]:
        return self.domains

    def listAllStoragePools(self, flags: int) -> list[_Pool]:
        return [self.pool] if self.pool is not None else []


def test_prune_pool_deletes_marker_then_copy_and_reaps_dead_runs_first() -> None:
    libvirt = pytest.importorskip("libvirt")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale, used, by_domain = copy("state", "a"), copy("state", "b"), copy("disk", "c")
    half = copy("disk", "d", pid=dead.pid)
    volumes = vols(stale, used, by_domain) + vols(half, complete=False)
    pool = _Pool(libvirt, volumes)
    disk = f"<disk><source pool='pytest-kvm' volume='{by_domain}'/></disk>"
    xml = f"<domain><devices>{disk}</devices></domain>"
    conn = _Conn([_Dom("vm", xml)], pool)
    read: list[int] = []

    def templates() -> dict[str, str]:
        read.append(len(pool.log))  # after the dead run's leftovers went
        return {copy_key(used): "t"}

    result = prune.prune_pool(conn, pool, templates)
    assert pool.log == [half, f"{stale}.ok", stale] and read == [1]
    assert [name for name, _ in result.removed] == [half, stale]
    assert dict(result.kept) == {used: "template t in the cache uses it",
                                 by_domain: "in use: domain vm"}  # fmt: skip


def test_pool_copies_name_each_templates_state_and_disk(tmp_path) -> None:
    from pytest_kvm.backends.libvirt.storage import file_sha256
    from pytest_kvm.template import pool_copies
    from tests.support.templates import base_image, make_template

    made = make_template(tmp_path / "templates", base_image(tmp_path), name="t1")
    state = hashlib.sha256((made / "state").read_bytes()).hexdigest()
    assert pool_copies(tmp_path / "templates") == {
        f"state-{state[:20]}": "t1",
        f"disk-{file_sha256(made / 'disk.qcow2')[:20]}": "t1",
    }


def test_cli_unreachable_libvirt_is_one_line_and_the_cache_is_pruned(tmp_path, capsys) -> None:
    from pytest_kvm import cli

    half = tmp_path / "templates" / ".t.building-999999999"
    half.mkdir(parents=True)
    uri = f"qemu:///system?socket={tmp_path}/no-such-sock"
    assert cli.main(["--cache", str(tmp_path), "template", "prune", "--uri", uri]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0] == f"removed {half}: half made" and not half.exists()
    assert len(lines) == 2
    assert lines[1].startswith(f"libvirt pool 'pytest-kvm' at {uri} not pruned: cannot connect")
    assert "--kvm-uri" not in lines[1]  # a pytest option: the CLI's was --uri
    assert "Traceback" not in captured.out + captured.err


def test_a_domain_whose_disks_cannot_be_read_stops_the_prune() -> None:
    """What that domain uses is unknown: nothing is deleted (keep when unsure)."""
    libvirt = pytest.importorskip("libvirt")

    class Unreadable(_Dom):
        def XMLDesc(self, flags: int) -> str:
            raise libvirt.libvirtError("access denied")

    stale = copy("state", "a")
    pool = _Pool(libvirt, vols(stale))
    pool.name = lambda: "pytest-kvm-unreadable"  # type: ignore[method-assign]
    with pytest.raises(libvirt.libvirtError):
        prune.prune_pool(_Conn([Unreadable("vm", "")], pool), pool, dict)
    assert pool.log == [] and stale in pool.vols


def test_without_uri_or_env_no_pool_is_touched(tmp_path, capsys, monkeypatch) -> None:
    from pytest_kvm import cli

    monkeypatch.delenv("PYTEST_KVM_URI", raising=False)
    monkeypatch.setattr(prune, "prune_uri", lambda *a: pytest.fail("a pool was pruned"))
    assert cli.main(["--cache", str(tmp_path), "template", "prune"]) == 0
    assert capsys.readouterr().out == "nothing to remove\n"
    tried: list[str] = []
    monkeypatch.setattr(prune, "prune_uri", lambda uri, *a: tried.append(uri) or prune.PoolPruned())
    monkeypatch.setenv("PYTEST_KVM_URI", "qemu:///a qemu+ssh://h/system")
    assert cli.main(["--cache", str(tmp_path), "template", "prune"]) == 0
    assert tried == ["qemu:///a", "qemu+ssh://h/system"]  # each of the env's URIs
