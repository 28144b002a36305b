"""The libvirt backend's per-run object: checks the URI, network and pool once,
makes each guest's LibvirtMachine, and ends the domains dead runs left."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ...errors import KvmConfigError
from ..base import Backend, Labels, MachineSpec
from .connection import (
    close_connections,
    connect,
    jump_for,
    load_libvirt,
    remote_problem,
)
from .domain import METADATA_NS, REFUSALS, LibvirtTarget, host_domain_type
from .machine import LibvirtMachine
from .storage import DEFAULT_POOL, reap_orphan_volumes, storage_pool

if TYPE_CHECKING:
    from ...config import Settings
    from ...ssh import SshJump


def check_network(conn: Any, uri: str, name: str) -> None:
    """A libvirt network named ``name`` exists there and is started."""
    libvirt, _ = load_libvirt()
    try:
        net = conn.networkLookupByName(name)
    except libvirt.libvirtError:
        known = ", ".join(sorted(conn.listNetworks() + conn.listDefinedNetworks()))
        raise KvmConfigError(
            f"--kvm-uri {uri}: libvirt network {name!r} does not exist "
            f"(networks there: {known or 'none'})"
        ) from None
    if not net.isActive():
        raise KvmConfigError(
            f"--kvm-uri {uri}: libvirt network {name!r} is not started "
            f"(virsh -c {uri} net-start {name})"
        )


class LibvirtBackend(Backend):
    """Guests as transient libvirt domains on ``settings.uri``, their disks in
    ``settings.pool`` (our own one by default)."""

    name = "libvirt"
    refusals = REFUSALS
    runs_swtpm = True
    ram_in_file = False  # virDomainSave writes RAM and devices into one save image
    # clone_mac: each clone's copy of the save image (made in the pool anyway) gets its
    # MAC in its XML and in slirp's saved DHCP table (machine.py, saveimage.py).

    def __init__(self, settings: Settings | None = None) -> None:
        super().__init__(settings)
        self._domain_type: str | None = None  # the host's decision ("": ours), once asked

    def _settings(self) -> Settings:
        if self.settings is None:
            raise KvmConfigError("the libvirt backend needs its target (URI and pool)")
        return self.settings

    @property
    def uri(self) -> str:
        return self._settings().uri

    def check(self) -> None:
        """Connect to the URI, find its network and pool (clear errors naming the
        URI), and delete what runs killed on this machine left in the pool."""
        settings = self._settings()
        uri = settings.uri
        problem = remote_problem(uri)
        if problem:
            raise KvmConfigError(problem)
        conn = connect(uri)
        if settings.network.kind == "libvirt":
            check_network(conn, uri, settings.network.name)
        pool = storage_pool(conn, uri, settings.pool or DEFAULT_POOL)
        reap_orphan_volumes(pool)

    def target(self, labels: Labels = ()) -> LibvirtTarget:
        """Where and as whom a guest with these owner labels runs."""
        settings = self._settings()
        return LibvirtTarget(settings.uri, settings.pool or DEFAULT_POOL, labels,
                             settings.cache / "locks", settings.accel)  # fmt: skip

    def machine(
        self,
        spec: MachineSpec,
        *,
        on_spawn: Callable[[int], None] | None = None,
        labels: Labels = (),
    ) -> LibvirtMachine:
        # No on_spawn: QEMU runs under libvirtd, which ends it (AUTODESTROY).
        return LibvirtMachine(spec, self.target(labels), spec.accel)

    def template_identity(self) -> dict[str, object]:
        """Templates here are libvirt save images restored by that host's libvirt and
        QEMU: the hypervisor host's name (not the URI: the same host reached locally
        or through SSH shares them) and both versions are in the key. Each host (and
        pool) gets its own upload of the template's disk and state. So is the domain
        type where the host decides it (``host_domain_type``: a remote host under
        ``--kvm-accel auto``), so that a template saved under TCG is never restored
        into a KVM domain nor the other way round; elsewhere it follows our own
        accelerator, already in the key (and a local URI's key stays as it was)."""
        conn = connect(self.uri)
        identity: dict[str, object] = {
            "backend": "libvirt",
            "host": conn.getHostname(),
            "libvirt": conn.getLibVersion(),
            "hypervisor": conn.getVersion(),
        }
        if self._domain_type is None:  # asked once a run: the host does not change
            self._domain_type = host_domain_type(conn, self.uri, self._settings().accel) or ""
        if self._domain_type:
            identity["domain_type"] = self._domain_type
        return identity

    def jump(self) -> SshJump | None:
        return jump_for(self.uri)

    @classmethod
    def reap(cls, lease: Mapping[str, Any]) -> list[str]:
        domain = lease.get("domain")
        if not domain:
            return []
        return destroy_leased_domain(str(lease.get("uri", "")), str(domain), lease)

    def close(self) -> None:
        close_connections()


def domain_is_the_leases(xml: str, data: Mapping[str, Any]) -> bool:
    """Whether a domain's owner labels (see plugin.py) name the lease's run, process and
    host: a run id alone may be another run's, on another host or after a reboot."""
    try:
        root = ET.fromstring(xml)  # noqa: S314 (libvirtd's own output of a parsed domain)
        owner = root.find(f"metadata/{{{METADATA_NS}}}owner")
    except ET.ParseError:
        return False
    want = {"run": data.get("run_id"), "pid": data.get("pid"), "host": data.get("host")}
    return owner is not None and all(
        value is not None and owner.get(key) == str(value) for key, value in want.items()
    )


def destroy_leased_domain(uri: str, domain: str, data: Mapping[str, Any]) -> list[str]:
    """Destroy a libvirt domain a dead run left (one created without AUTODESTROY)."""
    try:
        libvirt, _ = load_libvirt()
        conn = connect(uri)
    except Exception:  # no libvirt here, or its daemon is gone: nothing to do
        return []
    try:
        dom = conn.lookupByName(domain)
    except libvirt.libvirtError:
        return []
    try:
        xml = dom.XMLDesc(0)
        if not domain_is_the_leases(xml, data):
            return []  # not the domain this lease made
        dom.destroy()
    except libvirt.libvirtError:
        return []
    return [f"destroyed domain {domain}", *_delete_volumes(conn, domain, xml)]


def _delete_volumes(conn: Any, domain: str, xml: str) -> list[str]:
    """Delete the destroyed domain's own volumes (its overlay and seed, named after
    it), which a restored domain, never auto-destroyed, still held."""
    libvirt, _ = load_libvirt()
    done = []
    root = ET.fromstring(xml)  # noqa: S314 (libvirtd's own output)
    for source in root.findall("devices/disk/source"):
        pool, volume = source.get("pool"), source.get("volume")
        if not pool or not volume or not volume.startswith(f"{domain}."):
            continue
        try:
            conn.storagePoolLookupByName(pool).storageVolLookupByName(volume).delete(0)
        except libvirt.libvirtError:
            continue
        done.append(f"deleted volume {volume}")
    return done


BACKEND = LibvirtBackend
