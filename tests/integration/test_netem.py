"""kvm_vlan impairments with real guests: delay shows in round trips, loss in counts, a
partition stops TCP until heal(), and the segment's pcap holds both guests' frames.

A UDP echo server and probe in the guests' python3 measure it, not ping (one probe
every ``interval`` seconds, each reply matched to its sequence number, round trips
measured in the guest; it works on debian-12-minimal too, which has no ping).
"""

from __future__ import annotations

import json
import shlex
import shutil
import statistics
import subprocess
from pathlib import Path

from pytest_kvm.pcap import read_pcap

FETCH = "python3 -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())' "  # noqa: E501
PORT = 7007

ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(data, peer)
"""

PROBE = """
import json, select, socket, sys, time
host, port, count, interval = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sent, rtts, dups = {}, {}, 0
def drain(until, all_back=False):
    global dups
    while not (all_back and len(rtts) == count):
        left = until - time.monotonic()
        if left <= 0 or not select.select([s], [], [], left)[0]:
            return
        data, _ = s.recvfrom(2048)
        seq = int(data)
        if seq in rtts:
            dups += 1
        else:
            rtts[seq] = time.monotonic() - sent[seq]
for seq in range(count):
    sent[seq] = time.monotonic()
    s.sendto(str(seq).encode(), (host, port))
    drain(time.monotonic() + interval)
drain(time.monotonic() + 3, all_back=True)
print(json.dumps({"sent": count, "received": len(rtts), "dups": dups,
                  "rtt_ms": sorted(1000 * r for r in rtts.values())}))
"""


def _echo_on(guest) -> None:
    guest.succeed(f"nohup python3 -c {shlex.quote(ECHO)} {PORT} >/dev/null 2>&1 &")


def _probe(guest, host: str, count: int, interval: float) -> dict:
    out = guest.succeed(
        f"python3 -c {shlex.quote(PROBE)} {shlex.quote(host)} {PORT} {count} {interval}",
        timeout=120 + count * interval * 3,
    )
    return json.loads(out)


def test_delay_shows_in_round_trips_and_loss_in_counts(kvm_guest_factory, kvm_vlan):
    a = kvm_guest_factory(vlan=kvm_vlan)
    b = kvm_guest_factory(vlan=kvm_vlan)
    _echo_on(b)
    addr_b = kvm_vlan.address_of(b)
    a.wait_until_succeeds(
        f"python3 -c {shlex.quote(PROBE)} {addr_b} {PORT} 1 1 | grep -q '\"received\": 1'",
        timeout=60,
    )
    plain = _probe(a, addr_b, 20, 0.05)
    assert plain["received"] == 20

    kvm_vlan.impair(a, delay_ms=250)  # one way: a's frames only
    delayed = _probe(a, addr_b, 20, 0.05)
    assert delayed["received"] == 20
    assert min(delayed["rtt_ms"]) >= 250 * 0.95  # the guest's clock may be a hair off
    assert statistics.median(delayed["rtt_ms"]) >= statistics.median(plain["rtt_ms"]) + 200

    kvm_vlan.impair(b, delay_ms=250)  # both ways: twice
    both = _probe(a, addr_b, 10, 0.05)
    assert min(both["rtt_ms"]) >= 500 * 0.95

    kvm_vlan.heal()
    kvm_vlan.impair(a, loss=0.3, duplicate=0.2)
    lossy = _probe(a, addr_b, 300, 0.01)
    # 300 probes, 30 % lost: 90 expected, sd 8; 20 % of the rest doubled: 42, sd 6.
    assert 50 <= 300 - lossy["received"] <= 130, lossy["received"]
    assert 15 <= lossy["dups"] <= 75, lossy["dups"]

    kvm_vlan.heal()
    assert _probe(a, addr_b, 20, 0.05)["received"] == 20
    print(  # shown with the failure, or with -rP
        f"median RTT: plain {statistics.median(plain['rtt_ms']):.1f} ms, "
        f"delayed one way {statistics.median(delayed['rtt_ms']):.1f} ms, "
        f"both ways {statistics.median(both['rtt_ms']):.1f} ms; "
        f"loss 0.3: {300 - lossy['received']}/300 lost, {lossy['dups']} duplicates"
    )


def test_partition_stops_tcp_until_heal_and_the_pcap_has_both_guests(
    kvm_guest_factory, kvm_vlan, tmp_path: Path
):
    a = kvm_guest_factory(vlan=kvm_vlan)
    b = kvm_guest_factory(vlan=kvm_vlan)
    b.succeed("nohup python3 -m http.server 8000 --directory /etc >/dev/null 2>&1 &")
    b.wait_for_port(8000)
    url = f"http://{kvm_vlan.address_of(b)}:8000/hostname"
    hostname = b.succeed("cat /etc/hostname").strip()
    assert a.wait_until_succeeds(FETCH + url, timeout=60).strip() == hostname

    kvm_vlan.partition([a], [b])
    cut = a.run(FETCH + url)
    assert cut.exit_status != 0 and "timed out" in cut.stderr
    kvm_vlan.heal()
    assert a.wait_until_succeeds(FETCH + url, timeout=60).strip() == hostname

    saved = kvm_vlan.save_capture(tmp_path / "traffic.pcap")
    frames = [frame for _, frame in read_pcap(saved)]
    sources = {frame[6:12].hex(":") for frame in frames}
    assert {a.vlan_macs[0], b.vlan_macs[0]} <= sources
    tcpdump = shutil.which("tcpdump")
    assert tcpdump, "tcpdump is not installed (scripts/setup.sh installs it)"
    out = subprocess.run(
        [tcpdump, "-r", str(saved), "-n", "-e", "tcp port 8000"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"{a.vlan_macs[0]} > {b.vlan_macs[0]}" in out
    assert f"{b.vlan_macs[0]} > {a.vlan_macs[0]}" in out
