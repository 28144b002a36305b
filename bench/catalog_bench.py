"""Catalog images side by side: cold boot and restore to first command, per image.

    .venv/bin/python bench/catalog_bench.py --image debian-12-minimal --image debian-12 --runs 3

For the package set of issue 21 (``debian-12``: Priority important and what Debian's
cloud images add; ``debian-12-minimal``: the small set it had before): does the
bigger image boot or restore slower? Templates are made first (their time is
printed, not in the table: it depends on whether they were cached). Then, run by
run, the images alternate, each with a cold boot and a restore, so that machine
noise hits every image alike. The first command is ``true`` over SSH; the package
count is ``dpkg-query`` in a restored guest.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

from restore_bench import first_command, stats  # a sibling script

from pytest_kvm import accel
from pytest_kvm.guest import Guest, GuestConfig
from pytest_kvm.images import Image
from pytest_kvm.images.store import resolve
from pytest_kvm.run import RunContext
from pytest_kvm.template import Shape, TemplateStore, qemu_version

INSTALLED = "dpkg-query -W -f '${db:Status-Status}\\n' | grep -cx installed"


def package_count(run: RunContext, image: Image, store: TemplateStore) -> int:
    config = GuestConfig(image=image, memory=1024, cpus=2)
    guest = Guest(run, config, template=store.get(image, Shape(1024, 2), 300))
    try:
        guest.start()
        return int(guest.succeed(INSTALLED))
    finally:
        guest.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", action="append", default=[])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "pytest-kvm")
    args = parser.parse_args()
    names = args.image or ["debian-12-minimal", "debian-12"]

    choice = accel.choose("auto")
    run = RunContext(choice)
    store = TemplateStore(args.cache / "templates", run, print)
    images = {name: resolve(name, args.cache, print) for name in names}
    cold: dict[str, list[float]] = {name: [] for name in names}
    restored: dict[str, list[float]] = {name: [] for name in names}
    counts: dict[str, int] = {}
    try:
        for name, image in images.items():
            t0 = time.monotonic()
            store.get(image, Shape(1024, 2), 300)
            print(f"{name}: template ready in {time.monotonic() - t0:.1f} s")
            counts[name] = package_count(run, image, store)
        for i in range(args.runs):
            for name, image in images.items():
                config = GuestConfig(image=image, memory=1024, cpus=2)
                restored[name].append(first_command(run, config, store))
                cold[name].append(first_command(run, config, None))
                print(
                    f"run {i + 1} {name}: restore {restored[name][-1]:.3f} s, "
                    f"cold boot {cold[name][-1]:.3f} s"
                )
    finally:
        run.close()
    print()
    print(f"- Date: {time.strftime('%Y-%m-%d %H:%M %Z')}")
    print(f"- Machine: {platform.platform()}, {os.cpu_count()} cores; {qemu_version()}")
    print(f"- Accelerator: {choice.name} ({choice.reason})")
    print(f"- Load average at the end: {os.getloadavg()[0]:.1f}")
    print()
    print("| image | packages | qcow2 MiB | what | median s | min..max s | runs |")
    print("|---|---|---|---|---|---|---|")
    for name, image in images.items():
        size = image.path.stat().st_blocks * 512 / 2**20
        for what, values in (("cold boot to first command", cold[name]),
                             ("restore to first command", restored[name])):  # fmt: skip
            timing = stats(values) if values else "- | - | 0"
            print(f"| {name} | {counts[name]} | {size:.0f} | {what} | {timing} |")


if __name__ == "__main__":
    main()
