"""Restore to first command, two checkouts side by side (a refactor's "no slowdown").

    .venv/bin/python bench/compare_restore.py --old /path/to/old-checkout --runs 10

Each run restores one 1 GiB guest from the shared template with each checkout's own
code (its ``.venv`` and ``bench/restore_bench.py``'s ``first_command``), in turns
whose order alternates run by run, so that machine noise hits both alike. The
templates are made before timing (one for both where the checkouts agree on its key:
the same ``TEMPLATE_FORMAT`` and image; else one each). Prints the medians and their
ratio, and the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

# Run inside a checkout: one restore to first command, its seconds on the last line.
ONE_RESTORE = """
import sys
from pathlib import Path
sys.path.insert(0, "bench")
from restore_bench import first_command
from pytest_kvm import accel
from pytest_kvm.guest import GuestConfig
from pytest_kvm.images.store import resolve
from pytest_kvm.run import RunContext
from pytest_kvm.template import TemplateStore

image_name, cache, memory = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
image = resolve(image_name, cache, lambda line: None)
run = RunContext(accel.choose("auto"))
store = TemplateStore(cache / "templates", run, lambda line: None)
try:
    print(first_command(run, GuestConfig(image=image, memory=memory, cpus=2), store))
finally:
    store.close()
    run.close()
"""


def one(checkout: Path, image: str, cache: Path, memory: int) -> float:
    python = checkout / ".venv" / "bin" / "python"
    argv = [str(python), "-c", ONE_RESTORE, image, str(cache), str(memory)]
    done = subprocess.run(argv, cwd=checkout, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{checkout}: exit {done.returncode}\n{done.stderr[-3000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, required=True, help="the checkout to compare with")
    parser.add_argument("--new", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--image", default="debian-12")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--memory", type=int, default=1024)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "pytest-kvm")
    args = parser.parse_args()
    times: dict[str, list[float]] = {"old": [], "new": []}
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    # The templates, made once and not timed: each side's own where their keys differ
    # (another TEMPLATE_FORMAT or image), else the one both restore.
    one(args.new, args.image, args.cache, args.memory)
    one(args.old, args.image, args.cache, args.memory)
    for i in range(args.runs):
        order = ("old", "new") if i % 2 == 0 else ("new", "old")
        for which in order:
            times[which].append(one(getattr(args, which), args.image, args.cache, args.memory))
        print(
            f"run {i + 1}: old {times['old'][-1]:.3f} s, new {times['new'][-1]:.3f} s "
            f"(load {os.getloadavg()[0]:.2f})"
        )
        sys.stdout.flush()
    print("\n| checkout | median s | min..max s | runs |\n|---|---|---|---|")
    for which in ("old", "new"):
        values = times[which]
        print(
            f"| {which} ({getattr(args, which)}) | {statistics.median(values):.3f} | "
            f"{min(values):.3f}..{max(values):.3f} | {len(values)} |"
        )
    ratio = statistics.median(times["new"]) / statistics.median(times["old"])
    delta = statistics.median(times["new"]) - statistics.median(times["old"])
    print(f"\nnew / old (medians): **{ratio:.2f}** ({delta:+.3f} s)")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
