"""kvm_vlan impairments without sockets: plans with a scripted RNG, the timer heap with a
fake clock, partitions, validation, and the pcap writer and reader."""

from __future__ import annotations

import random
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from pytest_kvm.errors import KvmConfigError, KvmError
from pytest_kvm.netem import Impairment, Partitions, Schedule, port_rng
from pytest_kvm.pcap import PcapWriter, read_pcap


class ScriptedRng(random.Random):
    """``random()`` returns the scripted values in turn; ``uniform`` maps the next one."""

    def __init__(self, *values: float) -> None:
        super().__init__(0)
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0)

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.random()


def test_plan_loses_duplicates_and_delays_by_the_scripted_draws():
    imp = Impairment(delay_ms=100, loss=0.25, duplicate=0.5)
    assert imp.plan(ScriptedRng(0.1), now=10.0) == []  # 0.1 < loss: lost
    assert imp.plan(ScriptedRng(0.3, 0.4), now=10.0) == [10.1, 10.1]  # kept, duplicated
    assert imp.plan(ScriptedRng(0.3, 0.9), now=10.0) == [10.1]  # kept, once


def test_jitter_is_uniform_around_the_delay_and_never_negative():
    imp = Impairment(delay_ms=10, jitter_ms=20)
    assert imp.plan(ScriptedRng(0.0), 0.0) == [0.0]  # 10 - 20 ms: clamped to 0
    assert imp.plan(ScriptedRng(1.0), 0.0) == [pytest.approx(0.03)]
    assert imp.plan(ScriptedRng(0.5), 0.0) == [pytest.approx(0.01)]


def test_no_draws_without_loss_or_duplicates():
    # A pure delay draws nothing: the stream stays where it was.
    assert Impairment(delay_ms=50).plan(ScriptedRng(), 1.0) == [1.05]


def test_loss_rate_over_many_frames_and_the_same_seed_repeats():
    imp = Impairment(loss=0.3)
    rng = port_rng("tests/x.py::test_a", 0)
    kept = sum(bool(imp.plan(rng, 0.0)) for _ in range(10_000))
    assert 6_700 < kept < 7_300

    def outcomes(seed: str, port: int) -> list[bool]:
        stream = port_rng(seed, port)
        return [bool(imp.plan(stream, 0.0)) for _ in range(200)]

    assert outcomes("s", 0) == outcomes("s", 0)
    # Another port, or another seed: another stream.
    assert outcomes("s", 0) != outcomes("s", 1)
    assert outcomes("s", 0) != outcomes("t", 0)


def test_schedule_pops_in_due_order_with_a_fake_clock():
    sched: Schedule[str] = Schedule()
    assert sched.timeout(0.0) is None
    sched.push(5.0, "late")
    sched.push(1.0, "early")
    sched.push(1.0, "early-second")  # same time: pushing order
    assert sched.timeout(0.5) == 0.5
    assert sched.pop_due(0.9) == []
    assert sched.pop_due(1.0) == ["early", "early-second"]
    assert sched.timeout(6.0) == 0.0  # overdue: at once
    assert len(sched) == 1
    assert sched.pop_due(6.0) == ["late"]
    assert len(sched) == 0


def test_partitions_block_both_ways_and_only_between_their_groups():
    parts = Partitions()
    assert not parts
    parts.add({"a"}, {"b", "c"})
    assert parts.blocks("a", "b") and parts.blocks("c", "a")
    assert not parts.blocks("b", "c") and not parts.blocks("a", "d")
    parts.clear()
    assert not parts.blocks("a", "b")


@pytest.mark.parametrize(
    "kwargs, says",
    [
        ({"delay_ms": -5}, "delay_ms=-5 is negative"),
        ({"jitter_ms": -1}, "jitter_ms=-1 is negative"),
        ({"loss": 1.5}, "loss=1.5 is not between 0 and 1"),
        ({"duplicate": -0.1}, "duplicate=-0.1 is not between 0 and 1"),
        ({"loss": "10%"}, "loss='10%' is not a finite number"),
        ({"delay_ms": float("nan")}, "delay_ms=nan is not a finite number"),
        ({"loss": True}, "loss=True is not a finite number"),
    ],
)
def test_bad_values_are_one_line_errors_naming_them(kwargs, says):
    values = {"delay_ms": 0, "jitter_ms": 0, "loss": 0.0, "duplicate": 0.0, **kwargs}
    with pytest.raises(KvmConfigError, match=f"^vlan 'v': impair\\('g'\\): {says}$"):
        Impairment.checked("vlan 'v': impair('g')", **values)


def test_describes_itself():
    assert str(Impairment(delay_ms=100, loss=0.1)) == "delay 100 ms, loss 0.1"
    assert str(Impairment()) == "none" and Impairment().is_none


# -- pcap -------------------------------------------------------------------------------

FRAME = bytes.fromhex("ffffffffffff020000000001") + b"\x08\x06" + b"x" * 28


def test_pcap_round_trip_and_header(tmp_path: Path):
    path = tmp_path / "t.pcap"
    writer = PcapWriter(path).start()
    writer.write(FRAME, when=1700000000.25)
    writer.write(FRAME[::-1], when=1700000001.5)
    writer.close()
    writer.close()
    magic, major, minor, _, _, snaplen, linktype = struct.unpack_from("=IHHiIII", path.read_bytes())
    assert (magic, major, minor, snaplen, linktype) == (0xA1B2C3D4, 2, 4, 65535, 1)
    assert list(read_pcap(path)) == [(1700000000.25, FRAME), (1700000001.5, FRAME[::-1])]
    assert path.stat().st_mode & 0o777 == 0o600


def test_pcap_stops_writing_at_its_limit_and_counts_the_rest(tmp_path: Path):
    path = tmp_path / "t.pcap"
    writer = PcapWriter(path, limit=24 + 2 * (16 + len(FRAME))).start()
    for _ in range(5):
        writer.write(FRAME)
    writer.close()
    assert (writer.written, writer.skipped) == (2, 3)
    assert len(list(read_pcap(path))) == 2


def test_pcap_reader_refuses_what_is_not_a_pcap(tmp_path: Path):
    bad = tmp_path / "bad.pcap"
    bad.write_bytes(b"\x0a\x0d\x0d\x0a" + b"\0" * 40)  # pcapng
    with pytest.raises(KvmError, match="not a classic pcap file"):
        list(read_pcap(bad))


@pytest.mark.skipif(shutil.which("tcpdump") is None, reason="tcpdump is not installed")
def test_tcpdump_reads_the_file(tmp_path: Path):
    path = tmp_path / "t.pcap"
    writer = PcapWriter(path).start()
    writer.write(FRAME, when=1700000000.0)
    writer.close()
    out = subprocess.run(
        ["tcpdump", "-r", str(path), "-n", "-e"], capture_output=True, text=True, check=True
    )
    assert "02:00:00:00:00:01 > ff:ff:ff:ff:ff:ff" in out.stdout
    assert "link-type EN10MB" in out.stderr
