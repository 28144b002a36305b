import os
import socket
from pathlib import Path

import pytest

from pytest_kvm.errors import KvmConfigError
from pytest_kvm.network import (
    Identity,
    MacReservation,
    NetworkSpec,
    bridge_problem,
    free_port,
    has_net_admin,
    helper_problem,
    ipv4_from_agent,
    ipv4_from_console,
    netdev_args,
    no_tap_message,
)


def test_names_and_macs_unique_and_locally_administered():
    ident = Identity("ab12", "gw3")
    names = [ident.next_name() for _ in range(200)]
    assert names[0] == "kvm-ab12-gw3-01"
    assert len(set(names)) == 200
    macs = {ident.mac_for(n) for n in names}
    assert len(macs) == 200
    for mac in macs:
        first = int(mac.split(":")[0], 16)
        assert first & 0b10 and not first & 0b1  # locally administered, unicast


def test_two_workers_never_share_a_name():
    a, b = Identity("ab12", "gw0"), Identity("ab12", "gw1")
    assert {a.next_name() for _ in range(5)}.isdisjoint({b.next_name() for _ in range(5)})


def test_free_port_is_bindable_on_loopback():
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


# -- bridges, MACs, addresses -------------------------------------------------------------


def test_bridge_problem_names_what_is_wrong(tmp_path: Path):
    (tmp_path / "br0" / "bridge").mkdir(parents=True)
    (tmp_path / "eth0" / "brport").mkdir(parents=True)
    (tmp_path / "lo").mkdir()
    assert bridge_problem("br0", tmp_path) == ""
    assert "no network interface 'nope'" in bridge_problem("nope", tmp_path)
    assert "'eth0' is a bridge port" in bridge_problem("eth0", tmp_path)
    assert "'lo' is not a bridge" in bridge_problem("lo", tmp_path)


def test_net_admin_from_the_effective_capabilities(tmp_path: Path):
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapEff:\t0000000000001000\n")
    assert has_net_admin(status)
    status.write_text("Name:\tx\nCapEff:\t0000000000000000\n")
    assert not has_net_admin(status)


def test_helper_acl(tmp_path: Path):
    helper = tmp_path / "helper"
    helper.write_text("#!/bin/sh\n")
    helper.chmod(0o755)
    acl = tmp_path / "bridge.conf"
    assert "does not exist" in helper_problem(str(tmp_path / "none"), "br0", acl)
    assert f"{acl} does not exist" in helper_problem(str(helper), "br0", acl)
    acl.write_text("allow br1\n")
    assert "does not allow bridge 'br0'" in helper_problem(str(helper), "br0", acl)
    acl.write_text("# comment\nallow br0\n")
    if os.geteuid() == 0:  # root needs no setuid bit
        assert helper_problem(str(helper), "br0", acl) == ""
    acl.write_text("allow all\ndeny br0\n")
    assert "does not allow" in helper_problem(str(helper), "br0", acl)


def test_no_tap_message_is_one_line_and_says_what_to_do():
    text = no_tap_message("br0", "it is not setuid")
    assert "\n" not in text
    for part in ("CAP_NET_ADMIN", "chmod u+s", "allow br0", "bridge=br0,helper"):
        assert part in text


def test_mac_reservations_are_unique_and_released(tmp_path: Path):
    macs = tmp_path / "macs"
    first = MacReservation.reserve(directory=macs)
    second = MacReservation.reserve(directory=macs)
    assert first.mac != second.mac
    assert first.path.read_text().strip() == str(os.getpid())
    assert macs.stat().st_mode & 0o7777 == 0o700  # private to the user
    first.release()
    assert not first.path.exists() and second.path.exists()
    second.release()


def test_mac_reservation_of_a_dead_process_is_taken_over(tmp_path: Path, monkeypatch):
    monkeypatch.setattr("secrets.token_bytes", lambda n: b"\x01\x02\x03")
    (tmp_path / "026b76010203").write_text("999999999\n")  # no such pid
    taken = MacReservation.reserve(directory=tmp_path)
    assert taken.mac == "02:6b:76:01:02:03"
    (tmp_path / "026b76010203").write_text(f"{os.getppid()}\n")  # alive: not taken
    with pytest.raises(Exception, match="no free MAC"):
        MacReservation.reserve(directory=tmp_path, attempts=3)


def test_mac_reservation_avoids_macs_seen_on_the_bridge(tmp_path: Path, monkeypatch):
    values = iter([b"\x00\x00\x01", b"\x00\x00\x02"])
    monkeypatch.setattr("secrets.token_bytes", lambda n: next(values))
    got = MacReservation.reserve(taken={"02:6b:76:00:00:01"}, directory=tmp_path)
    assert got.mac == "02:6b:76:00:00:02"


def test_netdev_args_for_bridges():
    assert netdev_args(NetworkSpec("bridge", "br0"), netdev_id="net0", ssh_port=0, tap_fd=7) == [
        "-netdev",
        "tap,id=net0,fd=7,vhost=off",
    ]
    spec = NetworkSpec("bridge", "br0", "/usr/lib/qemu/qemu-bridge-helper")
    assert netdev_args(spec, netdev_id="net0", ssh_port=0) == [
        "-netdev",
        "bridge,id=net0,br=br0,helper=/usr/lib/qemu/qemu-bridge-helper",
    ]
    with pytest.raises(KvmConfigError):
        netdev_args(NetworkSpec("libvirt", "default"), netdev_id="net0", ssh_port=0)


def test_addresses_from_the_agent_and_the_console():
    interfaces = [
        {"name": "lo", "hardware-address": "00:00:00:00:00:00"},
        {
            "name": "enp0s5",
            "hardware-address": "02:6b:76:aa:bb:cc",
            "ip-addresses": [
                {"ip-address-type": "ipv6", "ip-address": "fe80::1"},
                {"ip-address-type": "ipv4", "ip-address": "10.77.0.60"},
            ],
        },
    ]
    assert ipv4_from_agent(interfaces, "02:6B:76:AA:BB:CC") == "10.77.0.60"
    assert ipv4_from_agent(interfaces, "02:6b:76:00:00:00") is None
    console = (
        "ci-info: | enp0s5 | True | 10.77.0.61 | 255.255.255.0 | global | 02:6b:76:aa:bb:cc |\n"
        "ci-info: | enp0s5 | True | fe80::1/64 |       .       |  link  | 02:6b:76:aa:bb:cc |\n"
    )
    assert ipv4_from_console(console, "02:6b:76:aa:bb:cc") == "10.77.0.61"
    assert ipv4_from_console(console, "02:6b:76:00:00:01") is None


def _reserve_from_a_small_space(directory: str, count: int, results, release) -> None:
    import secrets as real_secrets

    # 16 possible MACs for everyone: collisions are certain without the reservation.
    real_secrets.token_bytes = lambda n: bytes([0, 0, real_secrets.randbelow(16)])
    held = [MacReservation.reserve(directory=Path(directory)) for _ in range(count)]
    results.put([r.mac for r in held])
    release.get(timeout=60)  # hold them until the parent has every process's MACs


def test_mac_reservations_are_unique_across_processes(tmp_path: Path):
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    results, release = ctx.Queue(), ctx.Queue()
    procs = [
        ctx.Process(
            target=_reserve_from_a_small_space, args=(str(tmp_path / "m"), 3, results, release)
        )
        for _ in range(4)
    ]
    for proc in procs:
        proc.start()
    try:
        macs = [mac for _ in procs for mac in results.get(timeout=30)]
    finally:
        for _ in procs:
            release.put(None)
    for proc in procs:
        proc.join(30)
    assert len(macs) == 12 and len(set(macs)) == 12
