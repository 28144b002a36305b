"""Restore to first command, two checkouts side by side (a refactor's "no slowdown").

    .venv/bin/python bench/compare_restore.py --old /path/to/old-checkout --runs 10

Each run restores one 1 GiB guest from the shared template with each checkout's own
code (its ``.venv`` and ``bench/restore_bench.py``'s ``first_command``), in turns
whose order alternates run by run, so that machine noise hits both alike. The
templates are made before timing (one for both where the checkouts agree on its key:
the same ``TEMPLATE_FORMAT`` and image; else one each). Prints the medians and their
ratio, and the load average before and after. Each run also reports the CPU seconds
its QEMU used from start to the first command (all threads: vCPUs, slirp, migration),
read from /proc: on a loaded machine wall times spread widely, the work each side
makes the guest do much less.
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

import os
import restore_bench

cpu = []


def qemu_cpu_seconds(name):
    # utime + stime of the QEMU whose -name is guest=NAME,...
    tag = f"guest={name},".encode()
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and tag in Path(f"/proc/{pid}/cmdline").read_bytes():
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except OSError:
            continue
    return float("nan")


class Measured(restore_bench.Guest):
    def succeed(self, *args, **kwargs):
        out = super().succeed(*args, **kwargs)
        cpu.append(qemu_cpu_seconds(self.name))
        return out


restore_bench.Guest = Measured
image_name, cache, memory = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
image = resolve(image_name, cache, lambda line: None)
run = RunContext(accel.choose("auto"))
store = TemplateStore(cache / "templates", run, lambda line: None)
try:
    wall = first_command(run, GuestConfig(image=image, memory=memory, cpus=2), store)
    print(cpu[0] if cpu else float("nan"))
    print(wall)
finally:
    store.close()
    run.close()
"""


def one(checkout: Path, image: str, cache: Path, memory: int) -> tuple[float, float]:
    """Wall seconds to the first command, and QEMU's CPU seconds by then."""
    python = checkout / ".venv" / "bin" / "python"
    argv = [str(python), "-c", ONE_RESTORE, image, str(cache), str(memory)]
    done = subprocess.run(argv, cwd=checkout, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{checkout}: exit {done.returncode}\n{done.stderr[-3000:]}")
    lines = done.stdout.strip().splitlines()
    return float(lines[-1]), float(lines[-2])


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
    cpus: dict[str, list[float]] = {"old": [], "new": []}
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    # The templates, made once and not timed: each side's own where their keys differ
    # (another TEMPLATE_FORMAT or image), else the one both restore.
    one(args.new, args.image, args.cache, args.memory)
    one(args.old, args.image, args.cache, args.memory)
    for i in range(args.runs):
        order = ("old", "new") if i % 2 == 0 else ("new", "old")
        for which in order:
            wall, cpu = one(getattr(args, which), args.image, args.cache, args.memory)
            times[which].append(wall)
            cpus[which].append(cpu)
        print(
            f"run {i + 1}: old {times['old'][-1]:.3f} s ({cpus['old'][-1]:.2f} s CPU), "
            f"new {times['new'][-1]:.3f} s ({cpus['new'][-1]:.2f} s CPU) "
            f"(load {os.getloadavg()[0]:.2f})"
        )
        sys.stdout.flush()
    print(
        "\n| checkout | median s | min..max s | QEMU CPU s, median | min..max | runs |"
        "\n|---|---|---|---|---|---|"
    )
    for which in ("old", "new"):
        values, used = times[which], cpus[which]
        print(
            f"| {which} ({getattr(args, which)}) | {statistics.median(values):.3f} | "
            f"{min(values):.3f}..{max(values):.3f} | {statistics.median(used):.2f} | "
            f"{min(used):.2f}..{max(used):.2f} | {len(values)} |"
        )
    ratio = statistics.median(times["new"]) / statistics.median(times["old"])
    delta = statistics.median(times["new"]) - statistics.median(times["old"])
    print(f"\nnew / old (medians): **{ratio:.2f}** ({delta:+.3f} s)")
    cpu_delta = statistics.median(cpus["new"]) - statistics.median(cpus["old"])
    print(f"QEMU CPU, new - old (medians): {cpu_delta:+.2f} s")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
