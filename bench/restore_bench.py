"""Restored clone against full boot, restore cost against memory, and whole test runs.

    .venv/bin/python bench/restore_bench.py --image debian-12 --runs 10

1. Debian 12 at 1 GiB: cold boot to first command and restore to first command,
   interleaved run by run so that machine noise hits both alike.
2. Restore to first command at 512 MiB, 1 GiB and 4 GiB (templates made first,
   not timed).
3. Wall time of ``pytest`` over 20 tiny guest tests with ``-n 0`` and ``-n 2``
   (templates already made, so this is the steady state a developer sees).

Each guest's first command is ``true`` over the guest's SSH connection.
"""

from __future__ import annotations

import argparse
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
from pytest_kvm.guest import Guest, GuestConfig
from pytest_kvm.images import Image
from pytest_kvm.images.store import resolve
from pytest_kvm.run import RunContext
from pytest_kvm.template import Shape, TemplateStore, qemu_version


def first_command(run: RunContext, config: GuestConfig, store: TemplateStore | None) -> float:
    """Seconds from asking for a guest to its first command done (template made before)."""
    template = None
    if store is not None:
        template = store.get(config.image, Shape(config.memory, config.cpus), 300)
    t0 = time.monotonic()
    guest = Guest(run, config, template=template)
    try:
        guest.start()
        guest.succeed("true")
        return time.monotonic() - t0
    finally:
        guest.close()


def stats(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} | {min(values):.3f}..{max(values):.3f} | {len(values)}"


def suite_wall_time(image: str, cache: Path, workers: int) -> float:
    with tempfile.TemporaryDirectory(prefix="bench-suite-") as tmp:
        test_file = Path(tmp) / "test_tiny.py"
        test_file.write_text(
            textwrap.dedent(
                """
                import pytest

                @pytest.mark.parametrize("n", range(20))
                def test_tiny(kvm_guest, n):
                    assert kvm_guest.succeed("echo $((1 + 1))").strip() == "2"
                """
            )
        )
        argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file),
                f"--kvm-image={image}", f"--kvm-cache={cache}", "-n", str(workers)]  # fmt: skip
        t0 = time.monotonic()
        done = subprocess.run(argv, cwd=tmp, capture_output=True, text=True)
        elapsed = time.monotonic() - t0
        if done.returncode != 0:
            raise RuntimeError(f"suite failed with -n {workers}:\n{done.stdout[-3000:]}")
        return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="debian-12")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "pytest-kvm")
    parser.add_argument("--skip-suite", action="store_true")
    args = parser.parse_args()

    choice = accel.choose("auto")
    image: Image = resolve(args.image, args.cache, print)
    run = RunContext(choice)
    store = TemplateStore(args.cache / "templates", run, print)
    out: list[str] = []
    try:
        sizes = (512, 1024, 4096)
        for memory in sizes:  # make the templates up front; not timed
            store.get(image, Shape(memory, 2), 300)
        cold: list[float] = []
        restored: list[float] = []
        for i in range(args.runs):
            config = GuestConfig(image=image, memory=1024, cpus=2)
            restored.append(first_command(run, config, store))
            cold.append(first_command(run, config, None))
            print(f"run {i + 1}: restore {restored[-1]:.3f} s, cold boot {cold[-1]:.3f} s")
        by_size: dict[int, list[float]] = {m: [] for m in sizes}
        for _ in range(args.runs):
            for memory in sizes:
                config = GuestConfig(image=image, memory=memory, cpus=2)
                by_size[memory].append(first_command(run, config, store))
        out += [
            "| what | median s | min..max s | runs |",
            "|---|---|---|---|",
            f"| cold boot to first command, 1 GiB | {stats(cold)} |",
            f"| restore to first command, 1 GiB | {stats(restored)} |",
        ]
        out += [f"| restore to first command, {m} MiB | {stats(by_size[m])} |" for m in sizes]
        ratio = statistics.median(cold) / statistics.median(restored)
        out.append(f"\ncold boot / restore (medians): **{ratio:.1f}x**")
    finally:
        run.close()
    if not args.skip_suite:
        out += ["", "| 20 tiny tests | wall s |", "|---|---|"]
        for workers in (0, 2):
            wall = suite_wall_time(args.image, args.cache, workers)
            out.append(f"| `-n {workers}` | {wall:.1f} |")
    print()
    print(f"- Date: {time.strftime('%Y-%m-%d')}")
    print(f"- Machine: {platform.platform()}, {os.cpu_count()} cores; {qemu_version()}")
    print(f"- Accelerator: {choice.name} ({choice.reason})")
    print("\n".join(out))


if __name__ == "__main__":
    main()
