"""The libvirt backend: guests as transient libvirt domains, local or remote.

``connection`` (bindings, connections, event loop, keepalive, bounded calls),
``storage`` (pools, volumes, uploads, checksums), ``domain`` (LibvirtTarget, the
domain XML, REFUSALS), ``console`` (the serial console stream), ``agent`` (qemu-ga
through libvirt), ``machine`` (LibvirtMachine) and ``backend`` (LibvirtBackend).

Importable without libvirt-python (an optional extra): ``load_libvirt`` imports it
when a guest or check needs it.
"""

from .agent import LibvirtAgent
from .backend import (
    BACKEND,
    LibvirtBackend,
    check_network,
    destroy_leased_domain,
    domain_is_the_leases,
)
from .connection import (
    DESTROY_WAIT,
    KEEPALIVE,
    call_within,
    close_connections,
    connect,
    ensure_event_loop,
    forget_connection,
    is_remote,
    jump_for,
    load_libvirt,
    open_connection,
    remote_problem,
)
from .console import ConsolePump, open_console
from .domain import METADATA_NS, REFUSALS, LibvirtTarget, domain_xml, remote_domain_type
from .machine import LibvirtMachine
from .storage import (
    DEFAULT_POOL,
    complete_upload,
    file_sha256,
    lookup,
    reap_orphan_volumes,
    refresh_pool,
    storage_pool,
    upload_image,
    volume_name,
)

__all__ = [
    "BACKEND",
    "DEFAULT_POOL",
    "DESTROY_WAIT",
    "KEEPALIVE",
    "METADATA_NS",
    "REFUSALS",
    "ConsolePump",
    "LibvirtAgent",
    "LibvirtBackend",
    "LibvirtMachine",
    "LibvirtTarget",
    "call_within",
    "check_network",
    "close_connections",
    "complete_upload",
    "connect",
    "destroy_leased_domain",
    "domain_is_the_leases",
    "domain_xml",
    "ensure_event_loop",
    "file_sha256",
    "forget_connection",
    "is_remote",
    "jump_for",
    "load_libvirt",
    "lookup",
    "open_connection",
    "open_console",
    "reap_orphan_volumes",
    "refresh_pool",
    "remote_domain_type",
    "remote_problem",
    "storage_pool",
    "upload_image",
    "volume_name",
]
