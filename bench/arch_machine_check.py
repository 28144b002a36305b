"""The machine layer for aarch64 and riscv64 guests without an image: pytest-kvm's own
QEMU command line (``build_argv``) and ``QemuMachine`` start a guest, take a
screenshot, save its state (RAM in a shared file, ``x-ignore-shared``) and restore a
clone from it, as templates do.

    .venv/bin/python bench/arch_machine_check.py --arm64-kernel vmlinuz-*-arm64

aarch64: AAVMF boots the given kernel (e.g. from Debian's linux-image-*-arm64 .deb,
``dpkg-deb -x``) with no root file system, to its panic, which is where the state is
saved. riscv64: OpenSBI starts U-Boot, which has no disk to boot and waits at its
prompt. Prints each step's time; exits non-zero if a step fails.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from pytest_kvm.backends.base import Drive, MachineSpec
from pytest_kvm.backends.qemu.machine import QemuMachine
from pytest_kvm.config import NetworkSpec
from pytest_kvm.firmware import Firmware, Ovmf, UBoot
from pytest_kvm.network import free_port

PNG = b"\x89PNG"


def check(arch: str, firmware: Firmware, until: bytes, kernel: Path | None, append: str) -> None:
    work = Path(tempfile.mkdtemp(prefix=f"pytest-kvm-{arch}-"))
    try:
        efivars = None
        if isinstance(firmware, Ovmf):
            efivars = firmware.copy_vars(work / "efivars.fd")
        seed = work / "seed.img"
        seed.write_bytes(b"\0" * (1 << 20))

        def spec(**kw: object) -> MachineSpec:
            fields: dict[str, object] = dict(
                name=f"check-{arch}", workdir=work, drives=(Drive(seed, "raw", readonly=True),),
                memory=512, cpus=2, accel="tcg", network=NetworkSpec("user"),
                mac="02:6b:76:00:00:09", ssh_port=free_port(), kernel=kernel, append=append,
                firmware=firmware, efivars=efivars, arch=arch, ram_file=work / "ram",
                ram_shared=True,
            )  # fmt: skip
            fields.update(kw)
            return MachineSpec(**fields)  # type: ignore[arg-type]

        machine = QemuMachine(spec())
        print(f"{arch}: {' '.join(machine.argv)}")
        t0 = time.monotonic()
        machine.start()
        try:
            while until not in spec().serial_log.read_bytes():
                if time.monotonic() - t0 > 600 or not machine.is_running():
                    raise SystemExit(f"{arch}: never printed {until!r}")
                time.sleep(0.5)
            print(f"{arch}: {until.decode()!r} on the console after {time.monotonic() - t0:.1f} s")
            shot = machine.screenshot()
            png = shot.startswith(PNG)
            print(f"{arch}: screenshot {len(shot)} bytes, PNG: {png}")
            t1 = time.monotonic()
            machine.save_state(work / "state")
            print(f"{arch}: state saved in {time.monotonic() - t1:.2f} s, "
                  f"{(work / 'state').stat().st_size / 1e6:.1f} MB")  # fmt: skip
            machine.qmp("quit")
            machine.wait_for_exit(30)
        finally:
            machine.close()
        clone = QemuMachine(spec(name=f"clone-{arch}", ram_shared=False, incoming=work / "state"))
        t2 = time.monotonic()
        clone.start()
        try:
            status = clone.qmp("query-status")["status"]
            print(f"{arch}: clone restored, {status}, {time.monotonic() - t2:.2f} s after start")
            if status != "running":
                raise SystemExit(f"{arch}: the clone is {status}")
            clone.qmp("quit")
            clone.wait_for_exit(30)
        finally:
            clone.close()
    finally:
        shutil.rmtree(work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arm64-kernel", type=Path, help="an arm64 vmlinuz (else: no aarch64)")
    args = parser.parse_args()
    if args.arm64_kernel is not None:
        check("aarch64", Ovmf.find("uefi", arch="aarch64"), b"Kernel panic",
              args.arm64_kernel, "console=ttyAMA0 panic=0")  # fmt: skip
    check("riscv64", UBoot.find(), b"=> ", None, "")


if __name__ == "__main__":
    main()
