import socket

from pytest_kvm.network import Identity, free_port


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
