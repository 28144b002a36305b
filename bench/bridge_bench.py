"""A bridge guest restored from its template against a bridge guest booted.

    .venv/bin/python bench/bridge_bench.py --image debian-12 --runs 3

Run as root. The bench builds a network namespace with a bridge (br0, 10.77.0.1/24)
and dnsmasq answering DHCP on it (``--ping``: with dnsmasq's default check that an
address is free, which costs up to 3 s per new lease), as the bridge tests do
(``tests/integration/support/netns.py``), runs itself inside it and removes it
afterwards: no guest touches the host's interfaces. The bridge template is made
first (not timed). Each guest is measured from "guest requested" to "first command
done" (``true`` over SSH to its own DHCP address), 1 GiB, 2 vCPUs:

1. one clone restored from the bridge's template, and one booted guest, interleaved
   run by run;
2. four clones requested at once (threads), then four booted guests at once
   (``--together-boots 0`` leaves the boots out): the wall time until all four
   answered, and each one's. Every guest must hold its own DHCP lease (dnsmasq's
   lease table) for the address SSH used.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "integration" / "support"))


def stats(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} | {min(values):.3f}..{max(values):.3f} | {len(values)}"


def measure(args: argparse.Namespace) -> None:
    from netns import lease_for

    from pytest_kvm import accel
    from pytest_kvm.config import parse_network
    from pytest_kvm.guest import Guest, GuestConfig
    from pytest_kvm.images.store import resolve
    from pytest_kvm.run import RunContext
    from pytest_kvm.template import Shape, TemplateStore, qemu_version

    choice = accel.choose("auto")
    image = resolve(args.image, args.cache, print)
    run = RunContext(choice)
    network = parse_network(f"bridge={args.bridge}", "bridge_bench")
    config = GuestConfig(image=image, memory=1024, cpus=2, network=network)
    results: dict[str, list[float]] = {"clone": [], "boot": []}
    together: dict[str, tuple[float, list[float]]] = {}
    try:
        store = TemplateStore(args.cache / "templates", run, print)
        template = store.get(image, Shape(1024, 2, network=f"bridge={args.bridge}"), 600)

        def one(restored: bool) -> float:
            t0 = time.monotonic()
            with Guest(run, config, template=template if restored else None) as g:
                g.succeed("true")
                elapsed = time.monotonic() - t0
                assert lease_for(args.leases, g.mac) == g.address, (g.mac, g.address)
            return elapsed

        for i in range(args.runs):
            results["clone"].append(one(True))
            results["boot"].append(one(False))
            print(f"run {i + 1}: clone {results['clone'][-1]:.3f} s, "
                  f"boot {results['boot'][-1]:.3f} s", flush=True)  # fmt: skip
        kinds = [("clones", True)] + ([("boots", False)] if args.together_boots else [])
        for label, restored in kinds:
            t0 = time.monotonic()
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                each = list(pool.map(one, [restored] * 4))
            together[label] = (time.monotonic() - t0, each)
            print(f"four {label} at once: all answered after {together[label][0]:.1f} s "
                  f"(each {', '.join(f'{t:.1f}' for t in each)} s)", flush=True)  # fmt: skip
    finally:
        run.close()
    print()
    print(f"machine: {platform.node()} ({os.cpu_count()} CPUs), accel {choice.name}, "
          f"{qemu_version()}")  # fmt: skip
    print("| measure | median s | min..max s | runs |")
    print("|---|---|---|---|")
    print(f"| bridge guest from its template | {stats(results['clone'])} |")
    print(f"| bridge guest, real boot | {stats(results['boot'])} |")
    for label, (wall, each) in together.items():
        print(f"| four {label} at once, each | {stats(each)} |")
        print(f"| four {label} at once, until all answered | {wall:.3f} | - | 1 |")
    ratio = statistics.median(results["boot"]) / statistics.median(results["clone"])
    print(f"\nboot / clone (medians): **{ratio:.1f}x**")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="debian-12")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--together-boots", type=int, choices=(0, 1), default=1)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "pytest-kvm")
    parser.add_argument(
        "--ping",
        action="store_true",
        help="dnsmasq with its check that an address is free before it offers it (a "
        "ping, up to 3 s, one address at a time), as dnsmasq does by default; the "
        "bridge tests leave it out",
    )
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bridge", default="br0", help=argparse.SUPPRESS)
    parser.add_argument("--leases", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        measure(args)
        return
    if os.geteuid() != 0:
        sys.exit("bridge_bench.py makes a network namespace: run it as root")
    from netns import BRIDGE, BridgeNetns

    with (
        tempfile.TemporaryDirectory(prefix="bench-bridge-") as tmp,
        BridgeNetns(Path(tmp), ping=args.ping) as ns,
    ):
        argv = ns.exec_argv(sys.executable, __file__, "--inside", "--image", args.image,
                            "--runs", str(args.runs), "--cache", str(args.cache),
                            "--together-boots", str(args.together_boots),
                            "--bridge", BRIDGE, "--leases", str(ns.leases))  # fmt: skip
        sys.exit(subprocess.run(argv, check=False).returncode)


if __name__ == "__main__":
    main()
