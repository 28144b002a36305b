"""Soak: many guest tests in a row under xdist, then count failures and leftovers.

    .venv/bin/python bench/soak.py --image debian-12 --tests 200 --workers 2

Runs one inner pytest (``-n WORKERS``) over ``--tests`` guest tests, each a fresh
guest doing a little real work (commands, a file put and got back, a failing command
checked). Each worker records its own RSS (VmRSS) at its first and last test. After
the run: the count of failed tests, and what was left (QEMU processes of the run,
its runtime dirs, its leases). Prints a summary as Markdown for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pytest_kvm.reaper import leases  # noqa: E402

INNER = textwrap.dedent(
    """
    import json, os, time
    import pytest

    OUT = os.environ["SOAK_OUT"]
    TOTAL = int(os.environ["SOAK_TESTS"])
    seen = []


    def _rss_kib():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0


    def _record(kind):
        with open(OUT, "a") as out:
            worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
            out.write(json.dumps([kind, worker, _rss_kib(), time.time()]) + "\\n")


    @pytest.fixture(autouse=True)
    def _rss():
        if not seen:
            _record("first")
        seen.append(1)
        yield
        _record("last")


    @pytest.mark.parametrize("n", range(TOTAL))
    def test_soak(kvm_guest, n, tmp_path):
        g = kvm_guest
        assert g.succeed(f"echo {n}").strip() == str(n)
        src = tmp_path / "in.txt"
        src.write_text(f"soak {n}\\n")
        g.put(src, "/root/in.txt")
        assert g.succeed("cat /root/in.txt") == f"soak {n}\\n"
        back = g.get("/root/in.txt", tmp_path / "back.txt")
        assert back.read_text() == f"soak {n}\\n"
        assert g.run("exit 3").exit_status == 3
    """
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="debian-12")
    parser.add_argument("--tests", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pytest-kvm-soak-") as tmp:
        work = Path(tmp)
        (work / "test_soak.py").write_text(INNER)
        runtime = work / "rt"
        runtime.mkdir()
        out = work / "rss.jsonl"
        env = {
            **os.environ,
            "SOAK_OUT": str(out),
            "SOAK_TESTS": str(args.tests),
            "PYTEST_KVM_RUNTIME_DIR": str(runtime),
        }
        argv = [
            sys.executable, "-m", "pytest", "test_soak.py", f"--kvm-image={args.image}",
            "-n", str(args.workers), "-p", "no:cacheprovider", "-q",
        ]  # fmt: skip
        t0 = time.monotonic()
        proc = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True)
        wall = time.monotonic() - t0
        summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
        failed = int(m.group(1)) if (m := re.search(r"(\d+) failed", summary)) else 0
        passed = int(m.group(1)) if (m := re.search(r"(\d+) passed", summary)) else 0
        rss: dict[str, dict[str, int]] = {}
        if not out.exists():
            print(proc.stdout[-4000:], proc.stderr[-2000:])
            return 1
        for line in out.read_text().splitlines():
            kind, worker, kib, _ = json.loads(line)
            rss.setdefault(worker, {})
            if kind == "first" and "first" not in rss[worker]:
                rss[worker]["first"] = kib
            if kind == "last":
                rss[worker]["last"] = kib
        run_ids = {p.name.split("-")[2] for p in runtime.glob("pytest-kvm-*")}
        # Dirs carry a run id's first 8 hex digits, guest names all 16.
        run_ids |= {rid[:8] for rid in re.findall(r"kvm-([0-9a-f]{16})-gw\d+-\d\d", proc.stdout)}
        left_dirs = [str(p) for p in runtime.iterdir()]
        left_dirs += [str(p) for rid in run_ids for p in Path("/tmp").glob(f"pytest-kvm-{rid}-*")]
        left_leases = [
            str(lease.path)
            for lease in leases()
            if str(lease.data.get("dir") or lease.data.get("workdir", "")).startswith(tmp)
        ]
        qemu = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        left_qemu = [
            line
            for line in qemu.splitlines()
            if line.startswith("qemu-system") and str(runtime) in line
        ]
    print(f"exit status {proc.returncode}; {summary}")
    if proc.returncode != 0:
        print(proc.stdout[-4000:])
    print()
    print("| tests | workers | passed | failed | wall | per test | leftovers "
          "(qemu, dirs, leases) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {args.tests} | {args.workers} | {passed} | {failed} | {wall:.0f} s | "
        f"{wall / max(args.tests, 1):.2f} s | {len(left_qemu)}, {len(left_dirs)}, "
        f"{len(left_leases)} |"
    )
    print()
    print("| worker | RSS at first test | RSS at last test |")
    print("|---|---|---|")
    for worker, kib in sorted(rss.items()):
        print(
            f"| {worker} | {kib.get('first', 0) / 1024:.1f} MiB | "
            f"{kib.get('last', 0) / 1024:.1f} MiB |"
        )
    return 0 if proc.returncode == 0 and not (left_qemu or left_dirs or left_leases) else 1


if __name__ == "__main__":
    sys.exit(main())
