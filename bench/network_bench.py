"""What networks cost per guest: a plain clone against a clone on a kvm_vlan segment.

    .venv/bin/python bench/network_bench.py --image debian-12 --runs 10

Interleaved run by run, templates made first (not timed):

1. user network, no segment: guest requested -> first command done (``true``).
2. user network plus one kvm_vlan NIC: guest requested -> first command done; the
   clone has its own MAC and static address on the segment by then.
3. ``guest.forward_port(8080)`` on a running guest (a QMP round trip).
4. Segment round trip: guest A opens a TCP connection to guest B's sshd across the
   segment and reads its banner (bash's /dev/tcp, started over A's SSH).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from pytest_kvm import accel
from pytest_kvm.guest import Guest, GuestConfig
from pytest_kvm.images.store import resolve
from pytest_kvm.run import RunContext
from pytest_kvm.template import Shape, TemplateStore, qemu_version
from pytest_kvm.vlan import Vlan


def stats(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} | {min(values):.3f}..{max(values):.3f} | {len(values)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="debian-12")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "pytest-kvm")
    args = parser.parse_args()

    choice = accel.choose("auto")
    image = resolve(args.image, args.cache, print)
    run = RunContext(choice)
    store = TemplateStore(args.cache / "templates", run, print)
    plain_t = store.get(image, Shape(1024, 2), 300)
    vlan_t = store.get(image, Shape(1024, 2, vlans=1), 300)
    results: dict[str, list[float]] = {"plain": [], "vlan": [], "forward": [], "rtt": []}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-vlan-", dir="/tmp") as tmp:
            for i in range(args.runs):
                t0 = time.monotonic()
                with Guest(run, GuestConfig(image=image), template=plain_t) as plain:
                    plain.succeed("true")
                    results["plain"].append(time.monotonic() - t0)
                    t1 = time.monotonic()
                    plain.forward_port(8080)
                    results["forward"].append(time.monotonic() - t1)
                with Vlan(f"b{i}", Path(tmp) / f"v{i}") as vlan:
                    config = GuestConfig(image=image, vlans=(vlan,))
                    t0 = time.monotonic()
                    with Guest(run, config, template=vlan_t) as a:
                        a.succeed("true")
                        results["vlan"].append(time.monotonic() - t0)
                        with Guest(run, config, template=vlan_t) as b:
                            probe = (
                                "timeout 20 bash -c 'exec 3<>/dev/tcp/"
                                f"{vlan.address_of(b)}/22; head -c 4 <&3'"
                            )
                            t1 = time.monotonic()
                            assert a.succeed(probe) == "SSH-"
                            results["rtt"].append(time.monotonic() - t1)
                print(
                    f"run {i + 1}: plain {results['plain'][-1]:.3f} s, "
                    f"vlan {results['vlan'][-1]:.3f} s"
                )
    finally:
        run.close()
    ratio = statistics.median(results["vlan"]) / statistics.median(results["plain"])
    print()
    print(f"- Date: {time.strftime('%Y-%m-%d')}")
    print(f"- Machine: {platform.platform()}, {os.cpu_count()} cores; {qemu_version()}")
    print(f"- Accelerator: {choice.name} ({choice.reason})")
    print("| what | median s | min..max s | runs |")
    print("|---|---|---|---|")
    print(f"| clone, user network: request to first command | {stats(results['plain'])} |")
    print(f"| clone with a kvm_vlan NIC: request to first command | {stats(results['vlan'])} |")
    print(f"| forward_port on a running guest | {stats(results['forward'])} |")
    print(f"| TCP connect + banner across the segment (over SSH) | {stats(results['rtt'])} |")
    print(f"\nvlan clone / plain clone (medians): **{ratio:.2f}x**")


if __name__ == "__main__":
    main()
