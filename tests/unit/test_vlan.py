"""The kvm_vlan switch, driven by plain datagram sockets standing in for QEMU."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from pytest_kvm.errors import KvmConfigError
from pytest_kvm.vlan import Vlan

BROADCAST = b"\xff" * 6


def mac(n: int) -> bytes:
    return bytes([0x02, 0, 0, 0, 0, n])


def frame(dst: bytes, src: bytes, payload: bytes = b"hello") -> bytes:
    return dst + src + b"\x08\x00" + payload


class Port:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.3)

    def send(self, vlan: Vlan, data: bytes) -> None:
        self.sock.sendto(data, str(vlan.switch_path))

    def receive(self) -> bytes | None:
        try:
            return self.sock.recv(65536)
        except TimeoutError:
            return None


@pytest.fixture
def vlan(tmp_path: Path):
    with Vlan("t", tmp_path / "vlan") as segment:
        yield segment


def test_floods_broadcasts_then_forwards_to_learned_macs(vlan: Vlan, tmp_path: Path):
    ports = [Port(tmp_path / f"p{i}.sock") for i in range(3)]
    for i, port in enumerate(ports):
        vlan.attach(f"g{i}", "vlan0", f"02:00:00:00:00:0{i}", port.path)
    a, b, c = ports
    a.send(vlan, frame(BROADCAST, mac(1)))
    assert b.receive() == frame(BROADCAST, mac(1))
    assert c.receive() == frame(BROADCAST, mac(1))
    assert a.receive() is None  # never back to the sender
    b.send(vlan, frame(mac(1), mac(2), b"unicast"))
    assert a.receive() == frame(mac(1), mac(2), b"unicast")
    assert c.receive() is None  # a's MAC was learned: only a gets it


def test_ignores_sockets_not_attached_and_detached_guests(vlan: Vlan, tmp_path: Path):
    a, b = Port(tmp_path / "a.sock"), Port(tmp_path / "b.sock")
    stranger = Port(tmp_path / "s.sock")
    vlan.attach("a", "vlan0", "02:00:00:00:00:01", a.path)
    vlan.attach("b", "vlan0", "02:00:00:00:00:02", b.path)
    stranger.send(vlan, frame(BROADCAST, mac(9)))
    assert a.receive() is None and b.receive() is None
    vlan.detach("b")
    a.send(vlan, frame(BROADCAST, mac(1)))
    assert b.receive() is None
    with pytest.raises(KvmConfigError, match="not on vlan"):
        vlan.address_of("b")


def test_addresses_and_qemu_argument(vlan: Vlan, tmp_path: Path):
    p1 = vlan.attach("g1", "vlan0", "02:00:00:00:00:01", tmp_path / "g1.sock")
    p2 = vlan.attach("g2", "vlan1", "02:00:00:00:00:02", tmp_path / "g2.sock")
    assert (p1.address, p2.address, p1.prefixlen) == ("192.168.76.11", "192.168.76.12", 24)
    assert vlan.address_of("g2") == "192.168.76.12"
    assert p1.netdev_arg() == (
        f"dgram,id=vlan0,local.type=unix,local.path={tmp_path / 'g1.sock'},"
        f"remote.type=unix,remote.path={vlan.switch_path}"
    )
    assert vlan.switch_path.stat().st_mode & 0o777 == 0o600


def test_close_removes_the_socket_and_is_idempotent(tmp_path: Path):
    segment = Vlan("t", tmp_path / "v").start()
    assert segment.switch_path.exists()
    segment.close()
    segment.close()
    assert not (tmp_path / "v").exists()


@pytest.mark.parametrize("subnet, says", [("10.0.0.0/30", "too small"), ("nonsense", "subnet")])
def test_bad_subnet(tmp_path: Path, subnet: str, says: str):
    with pytest.raises(KvmConfigError, match=says):
        Vlan("t", tmp_path, subnet=subnet)
