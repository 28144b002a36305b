"""Wall time of the example suite over several images, serial against xdist.

    .venv/bin/python bench/matrix_bench.py --image debian-11 --image debian-12 \
        --image debian-13 --runs 1

Runs ``pytest examples/test_debian_basics.py examples/test_assertions.py`` over the
images in three ways, alternating run by run: ``-n 0``; ``-n 2`` (xdist's load
scheduling: every worker meets every image); ``-n 2 --kvm-dist-by-image``. The
images must be built, and a warm-up run first makes each image's template, so what
is timed is the suite itself (restores, the tests' work, the reboot test's boot),
not one-off template boots. ``-k EXPR`` selects tests as pytest's ``-k`` does (for
example ``-k "not reboot"``: the suite without its one real boot per image). Prints a
Markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUITE = ["examples/test_debian_basics.py", "examples/test_assertions.py"]
MODES = {
    "-n 0": ["-n", "0"],
    "-n 2": ["-n", "2"],
    "-n 2 --kvm-dist-by-image": ["-n", "2", "--kvm-dist-by-image"],
}


def run(images: list[str], extra: list[str], runtime: Path) -> tuple[float, str]:
    argv = [
        sys.executable, "-m", "pytest", *SUITE, *(f"--kvm-image={i}" for i in images),
        "-p", "no:cacheprovider", "-q", *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTEST_KVM_RUNTIME_DIR": str(runtime)}
    t0 = time.monotonic()
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    lines = proc.stdout.strip().splitlines()
    summary = lines[-1] if lines else ""
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-2000:], file=sys.stderr)
        raise SystemExit(f"{' '.join(extra)}: exit status {proc.returncode}: {summary}")
    return wall, re.sub(r"=+", "", summary).strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", action="append", required=True)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("-k", dest="keyword", help="pytest -k expression")
    args = parser.parse_args()
    select = ["-k", args.keyword] if args.keyword else []
    with tempfile.TemporaryDirectory(prefix="pytest-kvm-matrix-bench-") as tmp:
        runtime = Path(tmp)
        print("warm-up (templates) ...", file=sys.stderr)
        warm, summary = run(args.image, ["-n", "0", *select], runtime)
        print(f"warm-up: {warm:.0f} s, {summary}", file=sys.stderr)
        walls: dict[str, list[float]] = {mode: [] for mode in MODES}
        summaries: dict[str, str] = {}
        for i in range(args.runs):
            for mode, extra in MODES.items():
                wall, summaries[mode] = run(args.image, [*extra, *select], runtime)
                walls[mode].append(wall)
                print(f"run {i + 1}: {mode}: {wall:.1f} s ({summaries[mode]})", file=sys.stderr)
    base = statistics.median(walls["-n 0"])
    chosen = f"; -k {args.keyword!r}" if args.keyword else ""
    print(f"images: {', '.join(args.image)}{chosen}; warm-up {warm:.0f} s\n")
    print("| mode | median wall s | runs | tests | vs -n 0 |")
    print("|---|---|---|---|---|")
    for mode, values in walls.items():
        median = statistics.median(values)
        print(
            f"| `{mode}` | {median:.1f} | {', '.join(f'{v:.1f}' for v in values)} | "
            f"{summaries[mode]} | {base / median:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
