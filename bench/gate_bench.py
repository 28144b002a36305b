"""What the error gate (--kvm-fail-on) adds to a test whose guest has nothing to report.

    .venv/bin/python bench/gate_bench.py --image debian-12 --rounds 30 --suite 10

1. In one restored guest, ``--rounds`` rounds of simulated tests, one per setting in
   an order rotated round by round: the guest is handed over (``HandOver.now``: with
   a journal kind, one guest command for the journal's cursor), the "test" runs
   ``echo`` over SSH, then the gate's check runs. Settings: ``none``, ``panic`` (the
   default: the console since the hand-over, read on the host), ``coredump,oops``
   and all four (one guest command: ``journalctl --sync`` and the entries after the
   cursor). A bare ``true`` over SSH is timed beside them.
2. With ``--suite N``: the wall time of a pytest run of N tiny guest tests with
   ``--kvm-fail-on=none`` and with all four kinds, alternating, twice each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from pytest_kvm import accel
from pytest_kvm.template import qemu_version

KINDS = {
    "none": "",
    "panic (default)": "panic",
    "coredump,oops": "coredump,oops",
    "all four": "panic,oops,coredump,journal-err",
}

INNER = """
import json, time
from pytest_kvm.config import parse_fail_on
from pytest_kvm.guestlog import HandOver, check

KINDS = {kinds!r}

def test_gate_cost(kvm_guest):
    g = kvm_guest
    g.succeed("true")
    times = {{}}
    names = list(KINDS)
    for i in range({rounds}):
        order = names[i % len(names):] + names[:i % len(names)]
        for name in order:
            kinds = parse_fail_on(KINDS[name], "bench")
            t0 = time.monotonic()
            handover = HandOver.now(g, kinds)
            t1 = time.monotonic()
            g.succeed("echo the test")
            t2 = time.monotonic()
            verdict = check(g, handover, kinds)
            t3 = time.monotonic()
            assert not verdict.findings and not verdict.note, (name, verdict)
            for what, took in (("hand-over", t1 - t0), ("check", t3 - t2),
                               ("both", t1 - t0 + t3 - t2)):
                times.setdefault(f"{{name}}: {{what}}", []).append(took)
        t0 = time.monotonic()
        g.succeed("true")
        times.setdefault("bare `true` over SSH", []).append(time.monotonic() - t0)
    with open({out!r}, "w") as f:
        json.dump(times, f)
"""

SUITE = """
import pytest

@pytest.mark.parametrize("n", range({n}))
def test_tiny(kvm_guest, n):
    assert kvm_guest.succeed("echo $((1 + 1))").strip() == "2"
"""


def pytest_run(tmp: str, args: list[str]) -> float:
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    t0 = time.monotonic()
    done = subprocess.run(argv, cwd=tmp, capture_output=True, text=True)
    elapsed = time.monotonic() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{argv} failed:\n{done.stdout[-3000:]}{done.stderr[-2000:]}")
    return elapsed


def row(name: str, values: list[float]) -> str:
    med = statistics.median(values)
    return f"| {name} | {med * 1000:.1f} | {min(values) * 1000:.1f}..{max(values) * 1000:.1f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="debian-12")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--suite", type=int, default=0, help="tiny tests per suite run (0: skip)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "pytest-kvm")
    args = parser.parse_args()
    common = [f"--kvm-image={args.image}", f"--kvm-cache={args.cache}"]
    out: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-gate-") as tmp:
        result = Path(tmp) / "times.json"
        source = INNER.format(kinds=KINDS, rounds=args.rounds, out=str(result))
        Path(tmp, "test_gate_cost.py").write_text(textwrap.dedent(source))
        pytest_run(tmp, ["test_gate_cost.py", *common, "--kvm-fail-on=none"])
        times: dict[str, list[float]] = json.loads(result.read_text())
        out += ["| gate, per test | median ms | min..max ms |", "|---|---|---|"]
        out += [row(name, values) for name, values in times.items()]
        if args.suite:
            Path(tmp, "test_gate_cost.py").unlink()
            Path(tmp, "test_tiny.py").write_text(textwrap.dedent(SUITE.format(n=args.suite)))
            walls: dict[str, list[float]] = {"none": [], "all four": []}
            for _ in range(2):
                for name in walls:
                    kinds = KINDS[name] or "none"
                    walls[name].append(
                        pytest_run(tmp, ["test_tiny.py", *common, f"--kvm-fail-on={kinds}"])
                    )
            out += ["", f"| {args.suite} tiny tests, `--kvm-fail-on` | wall s (2 runs) |",
                    "|---|---|"]  # fmt: skip
            out += [f"| {n} | {', '.join(f'{w:.1f}' for w in v)} |" for n, v in walls.items()]
    choice = accel.choose("auto")
    print()
    print(f"- Date: {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"- Machine: {platform.platform()}, {os.cpu_count()} cores; {qemu_version()}")
    print(f"- Accelerator: {choice.name} ({choice.reason})")
    print(f"- Load average at the end: {os.getloadavg()[0]:.1f}")
    print("\n".join(out))


if __name__ == "__main__":
    main()
