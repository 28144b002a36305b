"""Cold boot and restore to first command per architecture and firmware, side by side
(issue 21 item 8).

    .venv/bin/python bench/arch_bench.py --image debian-12 --image debian-12@uefi \\
        --image debian-12@uefi-secure+tpm --image debian-12-arm64 \\
        --image debian-13-riscv64 --runs 3

``IMAGE@FIRMWARE`` picks a firmware (default: the architecture's ``auto``), and a
``+tpm`` suffix gives the guest an emulated TPM 2.0.

For each image: its template is made first (not timed, but its build time is
printed), then cold boots and restores alternate run by run, interleaved over the
images so that machine noise hits all alike. "First command" is
``guest.succeed("true")``; the clock starts when the guest is asked for. The load
average is printed with each run: TCG times on a shared machine are only
comparable as ratios taken in the same run.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

from pytest_kvm import accel, firmware
from pytest_kvm.config import Settings
from pytest_kvm.guest import Guest, GuestConfig
from pytest_kvm.images import Image
from pytest_kvm.images.store import resolve
from pytest_kvm.request import guest_arch
from pytest_kvm.run import RunContext
from pytest_kvm.template import Shape, Template, TemplateStore, qemu_version


def first_command(run: RunContext, config: GuestConfig, template: Template | None) -> float:
    t0 = time.monotonic()
    guest = Guest(run, config, template=template)
    try:
        guest.start()
        guest.succeed("true")
        return time.monotonic() - t0
    finally:
        guest.close()


def stats(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} | {min(values):.2f}..{max(values):.2f} | {len(values)}"


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", action="append", required=True)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "pytest-kvm")
    args = parser.parse_args()

    choice = accel.choose("auto")
    run = RunContext(choice)
    store = TemplateStore(args.cache / "templates", run, print)
    configs: dict[str, GuestConfig] = {}
    templates: dict[str, Template] = {}
    made: dict[str, float] = {}
    cold: dict[str, list[float]] = {}
    restored: dict[str, list[float]] = {}
    try:
        for spec in args.image:
            name, _, machine = spec.partition("@")
            tpm = machine.endswith("+tpm")
            image: Image = resolve(name, args.cache, print)
            arch = guest_arch(Settings(cache=args.cache), image)
            fw = firmware.resolve(machine.removesuffix("+tpm") or "auto", arch)
            configs[spec] = GuestConfig(
                image=image, memory=1024, cpus=2, arch=arch, firmware=fw, tpm=tpm
            )
            t0 = time.monotonic()
            shape = Shape(1024, 2, firmware=fw, arch=arch, tpm=tpm)
            templates[spec] = store.get(image, shape, 300)
            made[spec] = time.monotonic() - t0
            cold[spec], restored[spec] = [], []
        for i in range(args.runs):
            for spec, config in configs.items():
                restored[spec].append(first_command(run, config, templates[spec]))
                cold[spec].append(first_command(run, config, None))
                print(f"run {i + 1} {spec} ({config.arch}): restore {restored[spec][-1]:.2f} s, "
                      f"cold boot {cold[spec][-1]:.2f} s; load {load()}")  # fmt: skip
    finally:
        run.close()
    print()
    print(f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"- Machine: {platform.platform()}, {os.cpu_count()} cores; {qemu_version()}")
    print(f"- Accelerator: {choice.name} ({choice.reason}); foreign architectures: TCG")
    print(f"- Load average at the end: {load()}")
    print()
    print("| image | arch | what | median s | min..max s | runs |")
    print("|---|---|---|---|---|---|")
    for spec, config in configs.items():
        print(f"| {spec} | {config.arch} | cold boot to first command | {stats(cold[spec])} |")
        print(f"| {spec} | {config.arch} | restore to first command | {stats(restored[spec])} |")
    print()
    print("| image | template made (s, 0 if cached) | cold / restore |")
    print("|---|---|---|")
    for spec in configs:
        ratio = statistics.median(cold[spec]) / statistics.median(restored[spec])
        print(f"| {spec} | {made[spec]:.0f} | {ratio:.1f}x |")


if __name__ == "__main__":
    main()
