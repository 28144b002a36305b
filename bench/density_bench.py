"""Density: how many 1 GiB clones of one template run at once, against cold-booted guests.

    .venv/bin/python bench/density_bench.py --image debian-12 --max 24 --reserve 2048

1. Clones: restores 1 GiB guests from one template, one after another, and keeps them
   all running. After each new clone every live clone must answer a command over SSH
   (``true``). It stops at ``--max`` clones or when the host's MemAvailable would fall
   below ``--reserve`` MiB. Each QEMU's proportional set size (PSS, from
   ``/proc/PID/smaps_rollup``) is read with all clones alive: what one more clone adds.
2. Cold boots: ``--cold`` guests (1 GiB) boot for real, one after another, each kept
   running; their PSS once they answer. How many would fit is MemAvailable at the start
   (less the reserve) over the median PSS: computed, not run (booting twenty TCG
   guests takes hours here), and a cold guest's PSS only grows as it uses its RAM.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

from pytest_kvm import accel
from pytest_kvm.guest import Guest, GuestConfig
from pytest_kvm.images.store import resolve
from pytest_kvm.run import RunContext
from pytest_kvm.template import Shape, TemplateStore, qemu_version


def mem_available_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def pss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no Pss for pid {pid}")


def qemu_pid(guest: Guest) -> int:
    keeper = guest.machine.keeper() if guest.machine is not None else None
    pid = keeper.pid if keeper is not None else None  # the qemu backend's process
    if pid is None:
        raise RuntimeError(f"{guest.name}: no QEMU pid")
    return pid


def all_answer(guests: list[Guest]) -> None:
    for guest in guests:
        guest.succeed("true")


def clones(run: RunContext, store: TemplateStore, config: GuestConfig, args: argparse.Namespace
           ) -> tuple[int, list[float], list[float]]:  # fmt: skip
    template = store.get(config.image, Shape(config.memory, config.cpus), 300)
    live: list[Guest] = []
    restore_s: list[float] = []
    try:
        while len(live) < args.max:
            if mem_available_mib() < args.reserve + 256:
                print(f"stopping: MemAvailable {mem_available_mib()} MiB near the reserve")
                break
            t0 = time.monotonic()
            guest = Guest(run, config, f"dense-{len(live) + 1}", template=template)
            live.append(guest)
            guest.start()
            guest.succeed("true")
            restore_s.append(time.monotonic() - t0)
            all_answer(live)
            print(f"{len(live)} clones alive, all answer; last restore {restore_s[-1]:.2f} s; "
                  f"MemAvailable {mem_available_mib()} MiB")  # fmt: skip
        all_answer(live)
        pss = [pss_mib(qemu_pid(guest)) for guest in live]
        return len(live), pss, restore_s
    finally:
        for guest in reversed(live):
            guest.close()


def cold(run: RunContext, config: GuestConfig, count: int) -> list[float]:
    live: list[Guest] = []
    try:
        for i in range(count):
            guest = Guest(run, config, f"cold-{i + 1}")
            live.append(guest)
            guest.start()
            guest.succeed("true")
            print(f"cold guest {i + 1} answers")
        all_answer(live)
        return [pss_mib(qemu_pid(guest)) for guest in live]
    finally:
        for guest in reversed(live):
            guest.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="debian-12")
    parser.add_argument("--max", type=int, default=24)
    parser.add_argument("--cold", type=int, default=3)
    parser.add_argument("--reserve", type=int, default=2048, help="MiB left for the host")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "pytest-kvm")
    args = parser.parse_args()

    choice = accel.choose("auto")
    image = resolve(args.image, args.cache, print)
    run = RunContext(choice)
    store = TemplateStore(args.cache / "templates", run, print)
    config = GuestConfig(image=image, memory=1024, cpus=2)
    start_available = mem_available_mib()
    try:
        count, clone_pss, restore_s = clones(run, store, config, args)
        cold_pss = cold(run, config, args.cold)
    finally:
        store.close()
        run.close()
    fit = (start_available - args.reserve) / statistics.median(cold_pss)
    print()
    print(f"- Date: {time.strftime('%Y-%m-%d')}")
    print(f"- Machine: {platform.platform()}, {os.cpu_count()} cores, "
          f"MemAvailable at start {start_available} MiB; {qemu_version()}")  # fmt: skip
    print(f"- Accelerator: {choice.name} ({choice.reason})")
    print("| what | count | PSS per guest, median (min..max) MiB |")
    print("|---|---|---|")
    print(
        f"| 1 GiB clones alive at once, all answering | {count} | "
        f"{statistics.median(clone_pss):.0f} ({min(clone_pss):.0f}..{max(clone_pss):.0f}) |"
    )
    print(
        f"| 1 GiB cold boots measured | {len(cold_pss)} | "
        f"{statistics.median(cold_pss):.0f} ({min(cold_pss):.0f}..{max(cold_pss):.0f}) |"
    )
    print(
        f"\ncold guests that would fit in MemAvailable less {args.reserve} MiB at that "
        f"PSS: {fit:.0f}; clone restore to first command with N alive: median "
        f"{statistics.median(restore_s):.2f} s, last {restore_s[-1]:.2f} s"
    )


if __name__ == "__main__":
    main()
