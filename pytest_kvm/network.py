"""Guest identity on the network: names, MACs and host ports unique per run and worker."""

from __future__ import annotations

import hashlib
import itertools
import os
import secrets
import socket
import threading

from .config import NetworkSpec
from .errors import KvmConfigError

# Locally administered, unicast (second-lowest bit of the first octet set, lowest clear).
MAC_PREFIX = (0x02, 0x6B, 0x76)
# What a guest on user networking sees as the host (QEMU slirp's gateway).
USER_NET_HOST = "10.0.2.2"
USER_NET_GUEST = "10.0.2.15"


class Identity:
    """Hands out names and MACs unique to this run and worker."""

    def __init__(self, run_id: str | None = None, worker: str | None = None) -> None:
        self.run_id = run_id or secrets.token_hex(2)
        self.worker = worker or os.environ.get("PYTEST_XDIST_WORKER", "main")
        self._counter = itertools.count(1)
        self._lock = threading.Lock()

    def next_name(self, hint: str | None = None) -> str:
        with self._lock:
            n = next(self._counter)
        base = f"kvm-{self.run_id}-{self.worker}-{n:02d}"
        return f"{base}-{hint}" if hint else base

    def mac_for(self, name: str) -> str:
        digest = hashlib.sha256(f"{self.run_id}/{name}/{os.getpid()}".encode()).digest()
        octets = (*MAC_PREFIX, *digest[:3])
        return ":".join(f"{o:02x}" for o in octets)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the caller retries if it is taken later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def netdev_args(spec: NetworkSpec, *, netdev_id: str, ssh_port: int) -> list[str]:
    """QEMU ``-netdev`` argument for the guest's primary NIC."""
    if spec.kind == "user":
        return ["-netdev", f"user,id={netdev_id},hostfwd=tcp:127.0.0.1:{ssh_port}-:22"]
    raise KvmConfigError(f"network {spec} is not supported by the qemu backend yet (only user)")
