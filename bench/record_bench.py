"""What --kvm-record costs: a guest's command latency with and without its recorder
running, one screenshot, encoding the APNG, and a tiny test run's wall time.

    .venv/bin/python bench/record_bench.py --image debian-12 --runs 3

1. One restored guest with a display (the vga template, made first, not timed):
   blocks of ``--commands`` ``succeed("true")`` calls, alternately without and with a
   ``Recorder`` running (a screenshot a second); per-command latency of each block.
2. ``Machine.screenshot()`` + hash, timed alone; the APNG of the last recorded block.
3. ``pytest`` on two tiny tests with a display guest (one passes, one fails after a
   few commands), with and without ``--kvm-record``, alternately: wall seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pytest_kvm import accel
from pytest_kvm.guest import Guest, GuestConfig
from pytest_kvm.images.store import resolve
from pytest_kvm.recording import Recorder
from pytest_kvm.run import RunContext
from pytest_kvm.template import Shape, TemplateStore, qemu_version

INNER = """
import pytest


@pytest.mark.kvm(vnc=True)
def test_passes(kvm_guest):
    for i in range(10):
        kvm_guest.succeed(f"echo line {i} >/dev/tty1")


@pytest.mark.kvm(vnc=True)
def test_fails(kvm_guest):
    for i in range(10):
        kvm_guest.succeed(f"echo line {i} >/dev/tty1")
    assert False
"""


def stats(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} | {min(values):.3f}..{max(values):.3f} | {len(values)}"


def command_block(guest: Guest, commands: int) -> float:
    """Seconds per ``succeed("true")``, over ``commands`` calls."""
    t0 = time.monotonic()
    for _ in range(commands):
        guest.succeed("true")
    return (time.monotonic() - t0) / commands


def guest_part(args: argparse.Namespace, tmp: Path, results: dict[str, list[float]]) -> str:
    choice = accel.choose("auto")
    image = resolve(args.image, args.cache, print)
    run = RunContext(choice)
    try:
        store = TemplateStore(args.cache / "templates", run, print)
        template = store.get(image, Shape(1024, 2, display=True), 300)
        with Guest(run, GuestConfig(image=image, vnc=True), template=template) as guest:
            guest.succeed("true")  # warm: the first command translates sshd's paths
            machine = guest.machine
            assert machine is not None
            for _ in range(10):
                t0 = time.monotonic()
                hashlib.sha256(machine.screenshot()).digest()
                results["shot"].append(time.monotonic() - t0)
            note = ""
            for i in range(args.runs):
                results["plain"].append(command_block(guest, args.commands))
                recorder = Recorder("bench", machine.screenshot, tmp / f"frames{i}")
                recorder.start()
                try:
                    results["recorded"].append(command_block(guest, args.commands))
                finally:
                    recorder.stop()
                t0 = time.monotonic()
                saved = recorder.save(tmp / f"out{i}")
                results["encode"].append(time.monotonic() - t0)
                size = saved.stat().st_size if saved else 0
                note = f"{recorder.summary().strip()}; APNG {size} bytes"
                recorder.close()
                print(f"run {i + 1}: plain {results['plain'][-1]:.3f} s/command, "
                      f"recorded {results['recorded'][-1]:.3f} s/command; {note}")  # fmt: skip
        return f"{choice.name} ({choice.reason})|{note}"
    finally:
        run.close()


def pytest_part(args: argparse.Namespace, tmp: Path, results: dict[str, list[float]]) -> None:
    (tmp / "test_tiny.py").write_text(INNER)
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_tiny.py",
            f"--kvm-image={args.image}", f"--kvm-cache={args.cache}",
            f"--kvm-artifacts={tmp / 'artifacts'}"]  # fmt: skip
    for i in range(args.runs):
        for key, extra in (("wall-plain", []), ("wall-record", ["--kvm-record"])):
            t0 = time.monotonic()
            done = subprocess.run([*base, *extra], cwd=tmp, capture_output=True, text=True)
            results[key].append(time.monotonic() - t0)
            if "1 failed, 1 passed" not in done.stdout:
                raise SystemExit(f"inner run: {done.stdout[-2000:]}{done.stderr[-2000:]}")
            print(f"pytest run {i + 1} {key}: {results[key][-1]:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="debian-12")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--commands", type=int, default=30)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "pytest-kvm")
    args = parser.parse_args()
    results: dict[str, list[float]] = {
        k: [] for k in ("plain", "recorded", "shot", "encode", "wall-plain", "wall-record")
    }
    with tempfile.TemporaryDirectory(prefix="bench-record-", dir="/tmp") as name:
        tmp = Path(name)
        accel_text, note = guest_part(args, tmp, results).split("|", 1)
        pytest_part(args, tmp, results)
    print()
    print(f"- Date: {time.strftime('%Y-%m-%d')}")
    print(f"- Machine: {platform.platform()}, {os.cpu_count()} cores; {qemu_version()}")
    print(f"- Accelerator: {accel_text}")
    print(f"- Last recorded block: {note}")
    print("| what | median s | min..max s | runs |")
    print("|---|---|---|---|")
    print(f'| `succeed("true")`, no recorder | {stats(results["plain"])} |')
    print(f'| `succeed("true")`, recorder running | {stats(results["recorded"])} |')
    print(f"| one screenshot (QMP screendump + sha256) | {stats(results['shot'])} |")
    print(f"| encode the block's APNG (`Recorder.save`) | {stats(results['encode'])} |")
    tiny = "pytest, 2 tiny display tests,"
    print(f"| {tiny} without --kvm-record | {stats(results['wall-plain'])} |")
    print(f"| {tiny} --kvm-record | {stats(results['wall-record'])} |")
    ratio = statistics.median(results["recorded"]) / statistics.median(results["plain"])
    wall = statistics.median(results["wall-record"]) - statistics.median(results["wall-plain"])
    print(f"\ncommand latency recorded / plain (medians): **{ratio:.2f}x**; "
          f"wall time added to the run (medians): **{wall:+.2f} s**")  # fmt: skip


if __name__ == "__main__":
    main()
