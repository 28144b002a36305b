"""The kvm_vlan switch, driven by plain datagram sockets standing in for QEMU."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from pytest_kvm.errors import KvmConfigError, KvmError
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


# -- impairments, partitions and the capture (issue 22) ---------------------------------


@pytest.fixture
def three(vlan: Vlan, tmp_path: Path) -> list[Port]:
    ports = [Port(tmp_path / f"p{i}.sock") for i in range(3)]
    for i, port in enumerate(ports):
        vlan.attach(f"g{i}", "vlan0", f"02:00:00:00:00:0{i}", port.path)
    return ports


def test_a_delayed_frame_holds_up_no_other_frame(vlan: Vlan, three: list[Port]):
    a, b, c = three
    vlan.impair("g0", delay_ms=1500)
    a.send(vlan, frame(BROADCAST, mac(1), b"from-a"))
    c.send(vlan, frame(BROADCAST, mac(3), b"from-c"))
    assert b.receive() == frame(BROADCAST, mac(3), b"from-c")  # first, though sent second
    b.sock.settimeout(30)
    assert b.receive() == frame(BROADCAST, mac(1), b"from-a")


def test_loss_duplicates_and_heal(vlan: Vlan, three: list[Port]):
    a, b, _ = three
    vlan.impair("g0", loss=1.0)
    a.send(vlan, frame(BROADCAST, mac(1), b"lost"))
    assert b.receive() is None
    assert vlan.impairments() == {"g0": "loss 1"}
    vlan.impair("g0", duplicate=1.0)  # replaces the loss
    a.send(vlan, frame(BROADCAST, mac(1), b"twice"))
    assert [b.receive(), b.receive()] == [frame(BROADCAST, mac(1), b"twice")] * 2
    vlan.heal()
    assert vlan.impairments() == {}
    a.send(vlan, frame(BROADCAST, mac(1), b"once"))
    assert b.receive() == frame(BROADCAST, mac(1), b"once")
    assert b.receive() is None


def test_partition_stops_frames_between_groups_both_ways_until_heal(vlan: Vlan, three: list[Port]):
    a, b, c = three
    vlan.partition(["g0", "g1"], ["g2"])
    a.send(vlan, frame(BROADCAST, mac(1)))
    assert b.receive() == frame(BROADCAST, mac(1)) and c.receive() is None
    c.send(vlan, frame(mac(1), mac(3), b"unicast"))
    assert a.receive() is None
    vlan.heal()
    c.send(vlan, frame(mac(1), mac(3), b"unicast"))
    assert a.receive() == frame(mac(1), mac(3), b"unicast")


@pytest.mark.parametrize(
    "call, says",
    [
        (lambda v: v.impair("nobody", delay_ms=5), "^guest 'nobody' is not on vlan 't'$"),
        (lambda v: v.impair("g0", loss=2), r"^vlan 't': impair\('g0'\): loss=2 is not between"),
        (lambda v: v.partition(["g0"], ["g0", "g1"]), "^vlan 't': partition: 'g0' is in both"),
        (lambda v: v.partition("g0", ["g1"]), "^vlan 't': partition takes two lists of guests"),
        (lambda v: v.partition([], ["g1"]), "^vlan 't': partition: a group is empty$"),
        (lambda v: v.partition(["g0"], ["nobody"]), "^guest 'nobody' is not on vlan 't'$"),
    ],
)
def test_bad_impairments_are_clear_errors(vlan: Vlan, three: list[Port], call, says):
    with pytest.raises(KvmConfigError, match=says):
        call(vlan)
    assert vlan.impairments() == {}


def test_capture_holds_what_the_switch_delivered_and_is_kept_only_when_asked(tmp_path: Path):
    from pytest_kvm.pcap import read_pcap

    for keep in (False, True):
        segment = Vlan("t", tmp_path / f"v{keep}").start()
        a, b = Port(tmp_path / f"a{keep}.sock"), Port(tmp_path / f"b{keep}.sock")
        segment.attach("a", "vlan0", "02:00:00:00:00:01", a.path)
        segment.attach("b", "vlan0", "02:00:00:00:00:02", b.path)
        a.send(segment, frame(BROADCAST, mac(1), b"one"))
        assert b.receive() is not None
        b.send(segment, frame(mac(1), mac(2), b"two"))
        assert a.receive() is not None
        dest = tmp_path / "artifacts" / f"{keep}.pcap"
        if keep:
            segment.keep_capture(dest)
            assert [f for _, f in read_pcap(dest)][:1] == [frame(BROADCAST, mac(1), b"one")]
        live = segment.capture_path
        assert live is not None and live.exists()
        a.send(segment, frame(mac(2), mac(1), b"three"))
        assert b.receive() is not None
        segment.close()
        assert not live.exists()
        assert dest.exists() == keep
        if keep:  # the whole traffic, up to close
            payloads = [f[14:] for _, f in read_pcap(dest)]
            assert payloads == [b"one", b"two", b"three"]
            assert segment.capture_note() == "3 frames"


def test_no_capture_when_turned_off(tmp_path: Path):
    with Vlan("t", tmp_path / "v", capture=False) as segment:
        assert segment.capture_path is None
        with pytest.raises(KvmError, match="capture is off"):
            segment.save_capture(tmp_path / "x.pcap")


def test_the_same_seed_draws_the_same_losses_and_setting_it_restarts_the_streams(tmp_path: Path):
    def losses(seed: object, reseed: object = None) -> list[bool]:
        with Vlan("t", tmp_path / "v", seed=seed) as segment:
            ports = [Port(tmp_path / f"{n}.sock") for n in "abc"]
            for i, port in enumerate(ports):
                segment.attach("abc"[i], "vlan0", f"02:00:00:00:00:0{i}", port.path)
            a, b, c = ports
            b.sock.settimeout(30)
            segment.impair("a", loss=0.5)
            if reseed is not None:
                segment.seed = reseed
            seen = []
            for _ in range(24):
                # c's marker reaches the switch after a's frame, and is never lost.
                a.send(segment, frame(BROADCAST, mac(1), b"frame"))
                c.send(segment, frame(BROADCAST, mac(3), b"marker"))
                first = b.receive()
                seen.append(first == frame(BROADCAST, mac(1), b"frame"))
                if seen[-1]:
                    assert b.receive() == frame(BROADCAST, mac(3), b"marker")
            for port in ports:
                port.sock.close()
                port.path.unlink()
        return seen

    first = losses("tests/x.py::test_a")
    assert 0 < sum(first) < 24
    assert first == losses("tests/x.py::test_a")
    assert first != losses("tests/x.py::test_b")
    assert losses("other", reseed="tests/x.py::test_a") == first
