"""What an installer test costs, side by side with a plain real boot of the image.

    .venv/bin/python bench/installer_bench.py --image debian-12 --runs 3

In one pytest run (the plugin as users run it), each ``--runs`` times:

1. ``plain boot``: the catalog image booted for real to SSH (``snapshot=False``),
   the yardstick.
2. ``tiny CD``: the one-sector CD of tests/integration/support/tiny_boot.py on a blank disk:
   power-on to its console line, then power-off (the plumbing's own cost).
3. ``mini install``: the suite's installer ISO (tests/integration/support/mini_installer.py):
   power-on to its first question, answers to power-off, then ``boot_installed()``
   to SSH. The ISO is built before the first run if the cache lacks it (reported).

Prints a table of medians and each phase as a ratio of the plain boot.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

INNER = textwrap.dedent(
    """
    import json, os, re, sys, time
    import pytest
    sys.path.insert(0, os.environ["BENCH_ROOT"])
    from tests.integration.support.mini_installer import BANNER, build_installer_iso
    from tests.integration.support.tiny_boot import build_tiny_iso
    from pytest_kvm import accel
    from pytest_kvm.plugin import settings_key

    RUNS = int(os.environ["BENCH_RUNS"])
    OUT = os.environ["BENCH_OUT"]


    def record(what, seconds):
        with open(OUT, "a") as out:
            out.write(json.dumps([what, seconds]) + "\\n")


    @pytest.fixture
    def iso(request, kvm_image):
        settings = request.config.stash[settings_key]
        image = kvm_image
        t0 = time.monotonic()
        path = build_installer_iso(settings.cache, image,
                                   force_tcg=accel.choose(settings.accel).name != "kvm")
        record("installer ISO (cached after its first build)", time.monotonic() - t0)
        return path


    @pytest.mark.parametrize("run", range(RUNS))
    @pytest.mark.kvm(snapshot=False)
    def test_plain_boot(kvm_guest_factory, run):
        t0 = time.monotonic()
        kvm_guest_factory()
        record("plain boot to SSH", time.monotonic() - t0)


    @pytest.mark.parametrize("run", range(RUNS))
    def test_tiny_cd(kvm_guest_factory, tmp_path, run):
        cd = build_tiny_iso(tmp_path / "tiny.iso")
        t0 = time.monotonic()
        g = kvm_guest_factory(cdrom=cd, boot="cdrom", disk_size="64M", ssh=False)
        g.console.expect("press a key", timeout=120)
        g.console.send("x")
        g.wait_for_shutdown(timeout=60)
        record("tiny CD: power-on to power-off", time.monotonic() - t0)


    @pytest.mark.parametrize("run", range(RUNS))
    def test_mini_install(kvm_guest_factory, iso, run):
        t0 = time.monotonic()
        inst = kvm_guest_factory(cdrom=iso, boot="cdrom", disk_size="3G", ssh=False)
        inst.console.expect(r"Hostname: ", timeout=300)
        t1 = time.monotonic()
        record("mini install: power-on to first question", t1 - t0)
        inst.console.send("bench-host\\n")
        inst.console.expect(r"Message of the day: ", timeout=60)
        inst.console.send("bench\\n")
        inst.wait_for_shutdown(timeout=600)
        t2 = time.monotonic()
        record("mini install: answers to power-off", t2 - t1)
        g = inst.boot_installed()
        assert g.succeed("hostname").strip() == "bench-host"
        t3 = time.monotonic()
        record("mini install: installed disk to SSH", t3 - t2)
        record("mini install: whole loop", t3 - t0)
    """
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--image", default="debian-12")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-installer-") as tmp:
        out = Path(tmp) / "times.jsonl"
        (Path(tmp) / "test_bench.py").write_text(INNER)
        env = {**os.environ, "BENCH_ROOT": str(ROOT), "BENCH_RUNS": str(args.runs),
               "BENCH_OUT": str(out)}  # fmt: skip
        argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                f"--kvm-image={args.image}", "-x", str(Path(tmp) / "test_bench.py")]  # fmt: skip
        done = subprocess.run(argv, env=env, cwd=tmp, timeout=7200, check=False)
        if done.returncode != 0:
            sys.exit(f"the benchmark's pytest run failed (exit {done.returncode})")
        rows: dict[str, list[float]] = {}
        for line in out.read_text().splitlines():
            what, seconds = json.loads(line)
            rows.setdefault(what, []).append(seconds)
    plain = statistics.median(rows["plain boot to SSH"])
    print("| what | median s | min..max | n | / plain boot |")
    print("|---|---|---|---|---|")
    for what, values in rows.items():
        median = statistics.median(values)
        print(f"| {what} | {median:.1f} | {min(values):.1f}..{max(values):.1f} | "
              f"{len(values)} | {median / plain:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
