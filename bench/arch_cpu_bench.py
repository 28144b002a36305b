"""Which TCG CPU model boots an arm64 kernel fastest (the choice in pytest_kvm/arch.py).

    .venv/bin/python bench/arch_cpu_bench.py --kernel /path/to/vmlinuz-*-arm64 --runs 3

Each run boots the kernel under AAVMF (a fresh copy of the variables) on
``qemu-system-aarch64 -M virt`` with no root file system, to its "VFS: Unable to
mount root" panic: the firmware and the kernel's whole start-up, no user space.
Reports the wall time to QEMU's exit and the kernel's own timestamp at the panic,
median over the runs, the CPU models interleaved run by run.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from pytest_kvm.firmware import Ovmf

MODELS = ("cortex-a72", "cortex-a57", "max,pauth-impdef=on", "max")
PANIC = re.compile(rb"\[\s*(\d+\.\d+)\] Kernel panic")


def boot_once(kernel: Path, cpu: str, work: Path) -> tuple[float, float]:
    aavmf = Ovmf.find("uefi", arch="aarch64")
    variables = aavmf.copy_vars(work / "vars.fd")
    log = work / "serial.log"
    log.unlink(missing_ok=True)
    argv = [
        "qemu-system-aarch64", "-machine", "virt", "-accel", "tcg,thread=multi",
        "-cpu", cpu, "-m", "1024", "-smp", "2", "-nodefaults", "-display", "none",
        "-serial", f"file:{log}", "-no-reboot",
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={aavmf.code}",
        "-drive", f"if=pflash,format=raw,unit=1,file={variables}",
        "-kernel", str(kernel), "-append", "console=ttyAMA0 panic=-1",
    ]  # fmt: skip
    t0 = time.monotonic()
    subprocess.run(argv, capture_output=True, timeout=600, check=True)
    wall = time.monotonic() - t0
    found = PANIC.search(log.read_bytes())
    return wall, float(found.group(1)) if found else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    walls: dict[str, list[float]] = {m: [] for m in MODELS}
    kernels: dict[str, list[float]] = {m: [] for m in MODELS}
    work = Path(tempfile.mkdtemp(prefix="pytest-kvm-cpu-bench-"))
    try:
        for i in range(args.runs):
            for model in MODELS:
                wall, at_panic = boot_once(args.kernel, model, work)
                walls[model].append(wall)
                kernels[model].append(at_panic)
                print(f"run {i + 1} {model}: wall {wall:.2f} s, kernel at panic {at_panic:.2f} s")
    finally:
        shutil.rmtree(work)
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"\n- Date: {when}; load {load}; kernel {args.kernel.name}\n")
    print("| -cpu | wall to exit, median s (min..max) | kernel clock at panic, median s |")
    print("|---|---|---|")
    for model in MODELS:
        w, k = walls[model], kernels[model]
        print(f"| `{model}` | {statistics.median(w):.2f} ({min(w):.2f}..{max(w):.2f}) | "
              f"{statistics.median(k):.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
