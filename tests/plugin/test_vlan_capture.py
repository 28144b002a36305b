"""A failed test keeps its kvm_vlan traffic as a pcap in its artifacts; a passed one
does not. The inner tests stand in for guests with plain datagram sockets."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from pytest_kvm.pcap import read_pcap

INNER = """
import socket

def talk(vlan, tmp_path, payload):
    socks = []
    for n in (1, 2):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.bind(str(tmp_path / f"p{n}.sock"))
        s.settimeout(5)
        vlan.attach(f"g{n}", "vlan0", f"02:00:00:00:00:0{n}", tmp_path / f"p{n}.sock")
        socks.append(s)
    frame = b"\\xff" * 6 + bytes.fromhex("020000000001") + b"\\x08\\x00" + payload
    socks[0].sendto(frame, str(vlan.switch_path))
    assert socks[1].recv(2048) == frame
    vlan.impair("g1", delay_ms=5)

def test_fails(kvm_vlan, tmp_path):
    talk(kvm_vlan, tmp_path, b"from-the-failed-test")
    assert False, "boom"

def test_passes(kvm_vlan, tmp_path):
    talk(kvm_vlan, tmp_path, b"from-the-passed-test")
"""


def test_failed_test_keeps_its_vlan_pcap_and_a_passed_one_does_not(pytester: pytest.Pytester):
    pytester.makepyfile(test_inner=INNER)
    artifacts = pytester.path / "arts"
    result = pytester.runpytest(f"--kvm-artifacts={artifacts}", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*kvm vlan capture: vlan*",
            "*test_inner.py__test_fails*vlan*.pcap (1 frames; seed 'test_inner.py::test_fails')*",
            "*kvm vlan impairments: vlan*",
            "g1: delay 5 ms",
        ]
    )
    kept = sorted(artifacts.rglob("*.pcap"))
    assert [p.parent.name for p in kept] == ["test_inner.py__test_fails"]
    frames = [frame for _, frame in read_pcap(kept[0])]
    assert [f[14:] for f in frames] == [b"from-the-failed-test"]
    assert kept[0].stat().st_mode & 0o077 == 0
    if shutil.which("tcpdump"):
        out = subprocess.run(
            ["tcpdump", "-r", str(kept[0]), "-n", "-e"], capture_output=True, text=True, check=True
        )
        assert "02:00:00:00:00:01 > ff:ff:ff:ff:ff:ff" in out.stdout
