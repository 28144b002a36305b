"""``kvm_vlan``: a private layer-2 segment between the guests of one test, without root.

Each guest on the segment gets one more NIC whose QEMU backend is a ``dgram`` netdev:
a UNIX datagram socket in the guest's private socket directory, talking to this
module's switch, a UNIX datagram socket in the run's private directory. The switch is
a learning Ethernet switch on a thread: it forwards each frame to the port that owns
the destination MAC, and floods broadcasts and unknown destinations. Nothing touches
the host's interfaces or IP stack, and no other user can reach the sockets (0700).

Every guest gets a static IPv4 address on the segment (``address_of``); ``Guest``
configures it in the guest once it is up.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import select
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

from .errors import KvmConfigError, KvmError

DEFAULT_SUBNET = "192.168.76.0/24"
FIRST_HOST = 11  # .1 to .10 are left for addresses a test sets itself
_FRAME_MAX = 65536


@dataclass(frozen=True)
class VlanPort:
    """One guest NIC on a segment."""

    netdev_id: str
    mac: str
    address: str  # without the prefix length
    prefixlen: int
    socket: Path  # QEMU binds this
    switch: Path  # and sends here

    def netdev_arg(self) -> str:
        for path in (self.socket, self.switch):
            if "," in str(path):
                raise KvmConfigError(f"socket path {str(path)!r} contains a comma")
        return (
            f"dgram,id={self.netdev_id},local.type=unix,local.path={self.socket},"
            f"remote.type=unix,remote.path={self.switch}"
        )


class Vlan:
    """A segment: ``start`` binds the switch and starts its thread; ``close`` ends both."""

    def __init__(self, name: str, directory: Path, subnet: str = DEFAULT_SUBNET) -> None:
        try:
            self.network = ipaddress.IPv4Network(subnet)
        except ValueError as exc:
            raise KvmConfigError(f"vlan {name!r}: subnet {subnet!r}: {exc}") from None
        if self.network.num_addresses < FIRST_HOST + 4:
            raise KvmConfigError(f"vlan {name!r}: subnet {subnet} is too small (use /27 or wider)")
        self.name = name
        self.directory = directory
        self._next = FIRST_HOST
        self._ports: dict[str, VlanPort] = {}  # guest name -> port
        self._peers: set[str] = set()  # socket paths of attached guests
        self._fdb: dict[bytes, str] = {}  # MAC -> socket path
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._wake: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self.frames = 0  # forwarded frames, for tests and reports

    @property
    def switch_path(self) -> Path:
        return self.directory / "switch.sock"

    @property
    def subnet(self) -> str:
        return str(self.network)

    def start(self) -> Vlan:
        if self._sock is not None:
            raise KvmError(f"vlan {self.name!r} already started")
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(str(self.switch_path))
            os.chmod(self.switch_path, 0o600)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._wake = os.pipe()
        self._thread = threading.Thread(target=self._serve, name=f"vlan-{self.name}", daemon=True)
        self._thread.start()
        return self

    def attach(self, guest: str, netdev_id: str, mac: str, socket_path: Path) -> VlanPort:
        """Reserve a port and an address for ``guest``'s NIC."""
        if self._sock is None:
            raise KvmError(f"vlan {self.name!r} is not started")
        with self._lock:
            host = self._next
            if host >= self.network.num_addresses - 1:
                raise KvmConfigError(f"vlan {self.name!r}: no address left in {self.subnet}")
            self._next += 1
            port = VlanPort(
                netdev_id=netdev_id,
                mac=mac,
                address=str(self.network.network_address + host),
                prefixlen=self.network.prefixlen,
                socket=socket_path,
                switch=self.switch_path,
            )
            self._ports[guest] = port
            self._peers.add(str(socket_path))
        return port

    def detach(self, guest: str) -> None:
        with self._lock:
            port = self._ports.pop(guest, None)
            if port is not None:
                path = str(port.socket)
                self._peers.discard(path)
                for mac in [m for m, p in self._fdb.items() if p == path]:
                    del self._fdb[mac]

    def address_of(self, guest: object) -> str:
        """The static IPv4 address of ``guest`` (a Guest or its name) on this segment."""
        name = str(getattr(guest, "name", guest))
        with self._lock:
            port = self._ports.get(name)
        if port is None:
            raise KvmConfigError(f"guest {name!r} is not on vlan {self.name!r}")
        return port.address

    # -- the switch -------------------------------------------------------------------

    def _serve(self) -> None:
        assert self._sock is not None and self._wake is not None
        sock, wake = self._sock, self._wake[0]
        while True:
            readable, _, _ = select.select([sock.fileno(), wake], [], [])
            if wake in readable:
                return
            while True:
                try:
                    frame, sender = sock.recvfrom(_FRAME_MAX)
                except BlockingIOError:
                    break
                except OSError:
                    return
                if len(frame) >= 14 and sender:
                    self._forward(sock, frame, str(sender))

    def _forward(self, sock: socket.socket, frame: bytes, sender: str) -> None:
        dst, src = frame[0:6], frame[6:12]
        with self._lock:
            if sender not in self._peers:
                return  # not a guest of this segment
            if not src[0] & 1:
                self._fdb[src] = sender
            target = self._fdb.get(dst) if not dst[0] & 1 else None
            targets = [target] if target else [p for p in self._peers if p != sender]
        for path in targets:
            # A guest that stopped, or whose socket is full: like a cable pulled.
            with contextlib.suppress(OSError):
                sock.sendto(frame, path)
        self.frames += 1

    def close(self) -> None:
        if self._wake is not None:
            with contextlib.suppress(OSError):
                os.write(self._wake[1], b"x")
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._wake is not None:
            for fd in self._wake:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._wake = None
        self.switch_path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.directory.rmdir()

    def __enter__(self) -> Vlan:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Vlan {self.name} {self.subnet} guests={sorted(self._ports)}>"
