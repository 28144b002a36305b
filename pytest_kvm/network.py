"""Guest networks: user, bridge and the NICs' identity (names, MACs, host ports).

- ``user``: QEMU's user-mode network. Rootless; SSH and any ``forward_port`` are bound
  to 127.0.0.1; the guest sees the host as ``USER_NET_HOST``.
- ``bridge=NAME``: a tap device on an existing Linux bridge. With CAP_NET_ADMIN the
  plugin opens the tap itself and hands QEMU the descriptor, so the tap lives exactly
  as long as QEMU (nothing to clean up, even after a SIGKILL); without it, QEMU's
  setuid ``qemu-bridge-helper`` opens it, if its ACL allows the bridge.
- MACs for bridges are random under a locally administered prefix (24 random bits),
  reserved in ``MAC_DIR`` (the user's private directory, one file per MAC, holding the
  owner's pid) and checked against the bridge's forwarding table, so no two guests on
  one LAN share one.

The private segments of ``kvm_vlan`` are in ``vlan.py``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import itertools
import json
import os
import re
import secrets
import socket
import stat
import struct
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from .errors import KvmConfigError, KvmError
from .private import private_dir, read_regular
from .util import pid_alive as pid_alive  # re-exported: backends import it here

# Locally administered, unicast (second-lowest bit of the first octet set, lowest clear).
MAC_PREFIX = (0x02, 0x6B, 0x76)
# What a guest on user networking sees as the host (QEMU slirp's gateway): a
# connection from the guest to 10.0.2.2:PORT reaches 127.0.0.1:PORT on the host.
USER_NET_HOST = "10.0.2.2"
USER_NET_GUEST = "10.0.2.15"
# MAC reservations, shared by every run of this user on this machine, whatever its
# TMPDIR; private to the user: in a shared directory anybody could plant files that
# block or hang us.
MAC_DIR = Path("/tmp") / f"pytest-kvm-macs-{os.getuid()}"
BRIDGE_ACL = Path("/etc/qemu/bridge.conf")
_CAP_NET_ADMIN = 12
_TUNSETIFF = 0x400454CA
_IFF_TAP, _IFF_NO_PI, _IFF_VNET_HDR = 0x0002, 0x1000, 0x4000


@dataclass(frozen=True)
class NetworkSpec:
    """A parsed ``--kvm-network`` value."""

    kind: str  # "user" | "bridge" | "libvirt"
    name: str = ""
    # bridge only: "" lets the plugin choose (its own tap with CAP_NET_ADMIN, else
    # qemu-bridge-helper); otherwise the helper binary QEMU must use.
    helper: str = ""

    def __str__(self) -> str:
        text = self.kind if not self.name else f"{self.kind}={self.name}"
        return f"{text},helper={self.helper}" if self.helper else text


class Identity:
    """Hands out names and MACs unique to this run and worker.

    ``run_id`` is 64 random bits: concurrent runs (also with the same worker label)
    never share guest names, leases or libvirt domains, all derived from it whole.
    ``short_id`` is its first 32 bits, for names that must stay short and are made
    unique otherwise (the run's temporary dirs, made by mkdtemp)."""

    def __init__(self, run_id: str | None = None, worker: str | None = None) -> None:
        self.run_id = run_id or secrets.token_hex(8)
        self.worker = worker or os.environ.get("PYTEST_XDIST_WORKER", "main")
        self._counter = itertools.count(1)
        self._lock = threading.Lock()

    @property
    def short_id(self) -> str:
        return self.run_id[:8]

    def next_name(self, hint: str | None = None) -> str:
        with self._lock:
            n = next(self._counter)
        base = f"kvm-{self.run_id}-{self.worker}-{n:02d}"
        return f"{base}-{hint}" if hint else base

    def mac_for(self, name: str) -> str:
        """A MAC for a NIC on a network private to this run (user, kvm_vlan)."""
        digest = hashlib.sha256(f"{self.run_id}/{name}/{os.getpid()}".encode()).digest()
        return format_mac((*MAC_PREFIX, *digest[:3]))


def format_mac(octets: tuple[int, ...] | bytes) -> str:
    return ":".join(f"{o:02x}" for o in octets)


# -- host ports (user networking) ------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the caller retries if it is taken later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.errno in (errno.EADDRINUSE, errno.EACCES)
    return False


def check_port_number(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise KvmConfigError(f"{what}={value!r} is not a TCP port number (1..65535)")
    return value


# -- bridges ------------------------------------------------------------------------------


def bridge_problem(name: str, sysfs: Path = Path("/sys/class/net")) -> str:
    """Why ``name`` cannot take a guest ("" if it is an existing bridge)."""
    dev = sysfs / name
    if not dev.exists():
        return (
            f"there is no network interface {name!r} here (in this network namespace); "
            "create the bridge first (see README: bridged networking)"
        )
    if not (dev / "bridge").is_dir():
        kind = "a bridge port" if (dev / "brport").exists() else "not a bridge"
        return f"{name!r} is {kind}; give the name of the bridge itself"
    return ""


def has_net_admin(status: Path = Path("/proc/self/status")) -> bool:
    """Whether this process may create tap devices (CAP_NET_ADMIN in its effective set)."""
    for line in status.read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> _CAP_NET_ADMIN & 1)
    return False


def helper_problem(helper: str, bridge: str, acl: Path = BRIDGE_ACL) -> str:
    """Why qemu-bridge-helper cannot put a guest on ``bridge`` ("" if it looks able)."""
    path = Path(helper)
    try:
        st = path.stat()
    except OSError:
        return f"{helper} does not exist (Debian package qemu-system-common)"
    if not os.access(path, os.X_OK):
        return f"{helper} is not executable by this user"
    if not (st.st_mode & stat.S_ISUID and st.st_uid == 0) and not has_net_admin():
        return f"{helper} is not setuid root (as root: chmod u+s {helper})"
    try:
        rules = acl.read_text()
    except FileNotFoundError:
        return f"{acl} does not exist; it must contain the line 'allow {bridge}'"
    except OSError:
        return ""  # not ours to read; the helper reads it as root and decides
    allowed = denied = False
    for line in rules.splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) == 2 and words[1] in (bridge, "all"):
            allowed |= words[0] == "allow"
            denied |= words[0] == "deny"
    if denied or not allowed:
        return f"{acl} does not allow bridge {bridge!r} (add the line 'allow {bridge}')"
    return ""


def no_tap_message(bridge: str, helper_reason: str) -> str:
    return (
        f"network bridge={bridge}: creating a tap device needs root or CAP_NET_ADMIN, "
        f"which this process lacks; and qemu-bridge-helper cannot do it for us: "
        f"{helper_reason}. Either run as root (or grant CAP_NET_ADMIN), or set up "
        f"the helper: chmod u+s /usr/lib/qemu/qemu-bridge-helper and put "
        f"'allow {bridge}' in {BRIDGE_ACL}, then use --kvm-network bridge={bridge},helper"
    )


def bridge_fdb_macs(bridge: str) -> set[str]:
    """MACs the bridge has seen (its forwarding table), lower case."""
    try:
        out = subprocess.run(
            ["bridge", "-j", "fdb", "show", "br", bridge],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        return {str(e.get("mac", "")).lower() for e in json.loads(out or "[]")}
    except (OSError, subprocess.SubprocessError, ValueError):
        return set()


class MacReservation:
    """One MAC reserved host-wide until ``release``; ``reserve`` picks a free one."""

    def __init__(self, mac: str, path: Path) -> None:
        self.mac = mac
        self.path = path

    @classmethod
    def reserve(
        cls, taken: set[str] | None = None, directory: Path = MAC_DIR, attempts: int = 64
    ) -> MacReservation:
        """A random locally administered MAC that no live reservation holds and that is
        not in ``taken`` (e.g. the bridge's forwarding table)."""
        private_dir(directory, "MAC reservation directory")
        for _ in range(attempts):
            mac = format_mac((*MAC_PREFIX, *secrets.token_bytes(3)))
            if taken and mac in taken:
                continue
            path = directory / mac.replace(":", "")
            if cls._claim(path):
                return cls(mac, path)
        raise KvmError(f"no free MAC address after {attempts} tries (see {directory})")

    @staticmethod
    def _claim(path: Path) -> bool:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
        for _ in range(2):
            try:
                fd = os.open(path, flags, 0o600)
            except FileExistsError:
                try:  # never a FIFO (its open would hang) nor through a symlink
                    owner = int(read_regular(path, 64).split()[0])
                except (OSError, ValueError, IndexError):
                    return False  # being written, or not ours to judge
                if pid_alive(owner):
                    return False
                with contextlib.suppress(OSError):  # its owner died: take it over
                    path.unlink()
                continue
            with os.fdopen(fd, "w") as out:
                out.write(f"{os.getpid()}\n")
            return True
        return False

    def release(self) -> None:
        with contextlib.suppress(OSError, IndexError):
            if read_regular(self.path, 64).split()[0] == str(os.getpid()).encode():
                self.path.unlink()


class Tap:
    """A tap device on ``bridge``, opened by this process (needs CAP_NET_ADMIN).

    Not persistent: it disappears when the last descriptor closes, i.e. when QEMU,
    which inherits it, exits. ``close`` closes this process's descriptor."""

    def __init__(self, bridge: str, ifname: str | None = None) -> None:
        self.bridge = bridge
        self.ifname = ifname or f"kvm{secrets.token_hex(4)}"
        self.fd: int | None = None

    def open(self) -> int:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        try:
            request = struct.pack(
                "16sH", self.ifname.encode(), _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR
            )
            fcntl.ioctl(fd, _TUNSETIFF, request)
            _ip("link", "set", "dev", self.ifname, "master", self.bridge, "up")
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return fd

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise KvmError(f"ip {' '.join(args)}: {result.stderr.strip() or result.returncode}")


# -- QEMU arguments ---------------------------------------------------------------------


def netdev_args(
    spec: NetworkSpec, *, netdev_id: str, ssh_port: int, tap_fd: int | None = None
) -> list[str]:
    """QEMU ``-netdev`` argument for the guest's primary NIC."""
    if spec.kind == "user":
        return ["-netdev", f"user,id={netdev_id},hostfwd=tcp:127.0.0.1:{ssh_port}-:22"]
    if spec.kind == "bridge":
        if tap_fd is not None:
            return ["-netdev", f"tap,id={netdev_id},fd={tap_fd},vhost=off"]
        if spec.helper:
            if "," in spec.helper:
                raise KvmConfigError(f"helper path {spec.helper!r} contains a comma")
            return ["-netdev", f"bridge,id={netdev_id},br={spec.name},helper={spec.helper}"]
        raise KvmConfigError(f"network {spec}: no tap device and no helper")
    raise KvmConfigError(f"network {spec} is not supported by the qemu backend")


# -- learning a guest's address ----------------------------------------------------------

_CI_INFO = re.compile(
    r"ci-info: \|\s*(?P<dev>\S+)\s*\|\s*True\s*\|\s*(?P<addr>\d+\.\d+\.\d+\.\d+)\s*\|"
    r"[^|]*\|[^|]*\|\s*(?P<mac>[0-9a-f:]{17})\s*\|"
)


def ipv4_from_agent(interfaces: list[dict[str, object]], mac: str) -> str | None:
    """The IPv4 address of the NIC with ``mac`` in a guest-network-get-interfaces answer."""
    for iface in interfaces:
        if str(iface.get("hardware-address", "")).lower() != mac.lower():
            continue
        for addr in iface.get("ip-addresses", []) or []:  # type: ignore[attr-defined]
            if addr.get("ip-address-type") == "ipv4":
                return str(addr["ip-address"])
    return None


def ipv4_from_console(text: str, mac: str) -> str | None:
    """The IPv4 address cloud-init's network table on the console shows for ``mac``."""
    found = None
    for match in _CI_INFO.finditer(text):
        if match.group("mac").lower() == mac.lower():
            found = match.group("addr")
    return found
