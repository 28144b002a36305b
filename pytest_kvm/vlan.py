"""``kvm_vlan``: a private layer-2 segment between the guests of one test, without root.

Each guest on the segment gets one more NIC whose QEMU backend is a ``dgram`` netdev:
a UNIX datagram socket in the guest's private socket directory, talking to this
module's switch, a UNIX datagram socket in the run's private directory. The switch is
a learning Ethernet switch on a thread: it forwards each frame to the port that owns
the destination MAC, and floods broadcasts and unknown destinations. Nothing touches
the host's interfaces or IP stack, and no other user can reach the sockets (0700).

Every guest gets a static IPv4 address on the segment (``address_of``); ``Guest``
configures it in the guest once it is up.

Impairments (``impair``: delay, jitter, loss, duplicates of the frames a guest sends)
and partitions (``partition``, ``heal``) are decided in netem.py; delayed frames wait in
a timer heap that the switch's ``select`` times out on, so one guest's delay holds up
no other frame. The switch writes every frame it delivers into a pcap file (pcap.py)
in the segment's directory; ``close`` deletes it unless ``keep_capture`` asked for it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import select
import shutil
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import KvmConfigError, KvmError
from .netem import Impairment, Partitions, Schedule, port_rng
from .pcap import PcapWriter

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

    def __init__(
        self,
        name: str,
        directory: Path,
        subnet: str = DEFAULT_SUBNET,
        seed: object = 0,
        capture: bool = True,
    ) -> None:
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
        self._seed = seed  # of the impairments' random draws (netem.port_rng)
        self._numbers: dict[str, int] = {}  # socket path -> port number, for its RNG
        self._impaired: dict[str, tuple[Impairment, random.Random]] = {}  # by socket path
        self._partitions = Partitions()
        self._pending: Schedule[tuple[str, bytes]] = Schedule()  # the switch thread's own
        self._capture = PcapWriter(directory / "traffic.pcap") if capture else None
        self._keep: Path | None = None  # where close() moves the capture

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
        if self._capture is not None:
            self._capture.start()
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
            self._numbers[str(socket_path)] = len(self._numbers)
        return port

    def detach(self, guest: str) -> None:
        with self._lock:
            port = self._ports.pop(guest, None)
            if port is not None:
                path = str(port.socket)
                self._peers.discard(path)
                self._impaired.pop(path, None)
                for mac in [m for m, p in self._fdb.items() if p == path]:
                    del self._fdb[mac]

    def address_of(self, guest: object) -> str:
        """The static IPv4 address of ``guest`` (a Guest or its name) on this segment."""
        return self._port_of(guest).address

    def _port_of(self, guest: object) -> VlanPort:
        name = str(getattr(guest, "name", guest))
        with self._lock:
            port = self._ports.get(name)
        if port is None:
            raise KvmConfigError(f"guest {name!r} is not on vlan {self.name!r}")
        return port

    # -- impairments ------------------------------------------------------------------

    @property
    def seed(self) -> object:
        """The seed of every port's random stream (the kvm_vlan fixture: the test's node
        id). Setting it starts each impaired port's stream again from the new seed."""
        return self._seed

    @seed.setter
    def seed(self, value: object) -> None:
        with self._lock:
            self._seed = value
            for path, (impairment, _) in self._impaired.items():
                self._impaired[path] = (impairment, port_rng(value, self._numbers[path]))

    def impair(
        self,
        guest: object,
        delay_ms: float = 0,
        jitter_ms: float = 0,
        loss: float = 0.0,
        duplicate: float = 0.0,
    ) -> None:
        """Impair the frames ``guest`` sends on this segment, as netem on its NIC would:
        each is delayed ``delay_ms`` ± ``jitter_ms`` (uniform), lost with probability
        ``loss``, sent twice with probability ``duplicate``. Replaces the guest's earlier
        impairment; all zero removes it. One way: a ping from ``guest`` to another takes
        ``delay_ms`` longer (impair both for twice that)."""
        name = str(getattr(guest, "name", guest))
        where = f"vlan {self.name!r}: impair({name!r})"
        impairment = Impairment.checked(where, delay_ms, jitter_ms, loss, duplicate)
        path = str(self._port_of(guest).socket)
        with self._lock:
            if impairment.is_none:
                self._impaired.pop(path, None)
                return
            previous = self._impaired.get(path)
            rng = previous[1] if previous else port_rng(self._seed, self._numbers[path])
            self._impaired[path] = (impairment, rng)

    def partition(self, a: Iterable[object], b: Iterable[object]) -> None:
        """No frame between a guest of ``a`` and a guest of ``b``, either way (broadcasts
        included), until ``heal``. Guests in neither group are not affected; several
        partitions add up."""
        groups = []
        for arg in (a, b):
            if isinstance(arg, str | bytes) or not isinstance(arg, Iterable):
                raise KvmConfigError(
                    f"vlan {self.name!r}: partition takes two lists of guests, got {arg!r}"
                )
            groups.append({str(self._port_of(g).socket): str(getattr(g, "name", g)) for g in arg})
        both = sorted(groups[0][p] for p in groups[0].keys() & groups[1].keys())
        if both:
            raise KvmConfigError(f"vlan {self.name!r}: partition: {both[0]!r} is in both groups")
        if not groups[0] or not groups[1]:
            raise KvmConfigError(f"vlan {self.name!r}: partition: a group is empty")
        with self._lock:
            self._partitions.add(groups[0], groups[1])

    def heal(self) -> None:
        """Remove every partition and impairment (frames already delayed still arrive)."""
        with self._lock:
            self._partitions.clear()
            self._impaired.clear()

    def impairments(self) -> dict[str, str]:
        """What is in force, by guest name (for reports): ``{"g1": "delay 100 ms"}``."""
        with self._lock:
            by_path = {str(p.socket): name for name, p in self._ports.items()}
            found = {by_path[path]: str(i) for path, (i, _) in self._impaired.items()}
            if self._partitions:
                found["(partitions)"] = str(len(self._partitions))
        return found

    # -- capture ----------------------------------------------------------------------

    @property
    def capture_path(self) -> Path | None:
        """The pcap the switch writes while the segment runs (None: capture off)."""
        return self._capture.path if self._capture is not None else None

    def save_capture(self, dest: Path) -> Path:
        """Copy the traffic so far into ``dest`` (a pcap file); returns ``dest``."""
        if self._capture is None:
            raise KvmError(f"vlan {self.name!r}: capture is off")
        self._capture.flush()
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self._capture.path, dest)
        return dest

    def keep_capture(self, dest: Path) -> Path:
        """``save_capture`` now, and again with everything at ``close`` (a failed test)."""
        self.save_capture(dest)
        self._keep = dest
        return dest

    def capture_note(self) -> str:
        """``N frames`` and, past the size limit, how many were not written."""
        if self._capture is None:
            return "capture off"
        note = f"{self._capture.written} frames"
        if self._capture.skipped:
            note += f", {self._capture.skipped} more not written (over {self._capture.limit} bytes)"
        return note

    # -- the switch -------------------------------------------------------------------

    def _serve(self) -> None:
        assert self._sock is not None and self._wake is not None
        sock, wake = self._sock, self._wake[0]
        while True:
            timeout = self._pending.timeout(time.monotonic())
            readable, _, _ = select.select([sock.fileno(), wake], [], [], timeout)
            if wake in readable:
                return
            while sock.fileno() in readable:
                try:
                    frame, sender = sock.recvfrom(_FRAME_MAX)
                except BlockingIOError:
                    break
                except OSError:
                    return
                if len(frame) >= 14 and sender:
                    self._receive(sock, frame, str(sender))
            for sender, frame in self._pending.pop_due(time.monotonic()):
                self._forward(sock, frame, sender)

    def _receive(self, sock: socket.socket, frame: bytes, sender: str) -> None:
        """A frame from a port: forwarded now, or, on an impaired port, as its plan says
        (not at all, twice, later)."""
        with self._lock:
            impaired = self._impaired.get(sender)
            now = time.monotonic()
            plan = impaired[0].plan(impaired[1], now) if impaired else None
        for due in [now] if plan is None else plan:
            if due <= now:  # no delay: before the frames read after it
                self._forward(sock, frame, sender)
            else:
                self._pending.push(due, (sender, frame))

    def _forward(self, sock: socket.socket, frame: bytes, sender: str) -> None:
        dst, src = frame[0:6], frame[6:12]
        with self._lock:
            if sender not in self._peers:
                return  # not a guest of this segment
            if not src[0] & 1:
                self._fdb[src] = sender
            target = self._fdb.get(dst) if not dst[0] & 1 else None
            targets = [target] if target else [p for p in self._peers if p != sender]
            if self._partitions:
                targets = [p for p in targets if not self._partitions.blocks(sender, p)]
        if not targets:
            return
        if self._capture is not None:
            self._capture.write(frame)
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
        self._close_capture()
        with contextlib.suppress(OSError):
            self.directory.rmdir()

    def _close_capture(self) -> None:
        """The whole capture into ``keep_capture``'s file, or deleted."""
        if self._capture is None:
            return
        self._capture.close()
        with contextlib.suppress(OSError):
            if self._keep is not None and self._capture.path.exists():
                shutil.move(self._capture.path, self._keep)
        self._capture.path.unlink(missing_ok=True)
        self._keep = None

    def __enter__(self) -> Vlan:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Vlan {self.name} {self.subnet} guests={sorted(self._ports)}>"
