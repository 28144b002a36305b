"""Per-test guest start on the libvirt backend against the qemu backend, same image.

    .venv/bin/python bench/libvirt_bench.py --image debian-12 --runs 3

Run as root. When no libvirtd answers, the bench starts one (with virtlogd) in a
network namespace of its own, runs itself there and stops it afterwards, like the
test suite. Interleaved run by run, the qemu template made first (not timed), each
measured from "guest requested" to "first command done" (``true`` over SSH):

1. qemu backend, restored from a template (the default fast path);
2. qemu backend, a real boot (``--kvm-snapshot=false``);
3. libvirt backend (qemu:///system), a real boot (``--kvm-snapshot=false``). The
   image is uploaded to the pool once, before run 1 (timed separately: ``upload``;
   ``--cold-upload`` removes the pool's copy first).
4. libvirt backend, restored from its template (``virDomainSave`` image, made
   first, not timed): the default since issue 20.
"""

from __future__ import annotations

import argparse
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
    from pytest_kvm import accel
    from pytest_kvm.backends import libvirt as lv
    from pytest_kvm.backends import load_backend
    from pytest_kvm.config import Settings
    from pytest_kvm.guest import Guest, GuestConfig
    from pytest_kvm.images.store import resolve
    from pytest_kvm.run import RunContext
    from pytest_kvm.template import Shape, TemplateStore, qemu_version

    choice = accel.choose("auto")
    image = resolve(args.image, args.cache, print)
    run = RunContext(choice)
    results: dict[str, list[float]] = {
        "template": [], "boot": [], "libvirt": [], "libvirt_template": [], "upload": []
    }  # fmt: skip
    try:
        store = TemplateStore(args.cache / "templates", run, print)
        template = store.get(image, Shape(1024, 2), 300)
        conn = lv.connect("qemu:///system")
        pool = lv.storage_pool(conn, "qemu:///system", lv.DEFAULT_POOL)
        if args.cold_upload:  # forget the uploaded image: time a real upload
            name = f"{image.path.stem[:40]}-{lv.file_sha256(image.path)[:20]}.qcow2"
            for vol in (name + ".ok", name):
                found = lv.lookup(pool, vol)
                if found is not None:
                    found.delete(0)
        t0 = time.monotonic()
        lv.upload_image(conn, pool, image.path, args.cache / "locks")
        results["upload"].append(time.monotonic() - t0)
        settings = Settings(backend="libvirt", uri="qemu:///system", cache=args.cache)
        runner = load_backend("libvirt", settings)
        labels = (("bench", "libvirt_bench"),)
        libvirt_config = GuestConfig(image=image, backend="libvirt", runner=runner, labels=labels)
        libvirt_template = store.get(image, Shape(1024, 2), 300, runner, labels)
        for i in range(args.runs):
            t0 = time.monotonic()
            with Guest(run, GuestConfig(image=image), template=template) as g:
                g.succeed("true")
                results["template"].append(time.monotonic() - t0)
            t0 = time.monotonic()
            with Guest(run, GuestConfig(image=image)) as g:
                g.succeed("true")
                results["boot"].append(time.monotonic() - t0)
            t0 = time.monotonic()
            with Guest(run, libvirt_config) as g:
                g.succeed("true")
                results["libvirt"].append(time.monotonic() - t0)
                usage = g.resource_usage()
            t0 = time.monotonic()
            with Guest(run, libvirt_config, template=libvirt_template) as g:
                g.succeed("true")
                results["libvirt_template"].append(time.monotonic() - t0)
            print(
                f"run {i + 1}: qemu template {results['template'][-1]:.3f} s, qemu boot "
                f"{results['boot'][-1]:.3f} s, libvirt boot {results['libvirt'][-1]:.3f} s "
                f"({usage}), libvirt template {results['libvirt_template'][-1]:.3f} s",
                flush=True,
            )
    finally:
        run.close()
        lv.close_connections()
    boot, libvirt = statistics.median(results["boot"]), statistics.median(results["libvirt"])
    print()
    print(f"machine: {platform.node()} ({os.cpu_count()} CPUs), accel {choice.name}, "
          f"{qemu_version()}, libvirt {lv.load_libvirt()[0].getVersion()}")  # fmt: skip
    print("| measure | median s | min..max s | runs |")
    print("|---|---|---|---|")
    print(f"| qemu backend, from a template | {stats(results['template'])} |")
    print(f"| qemu backend, real boot | {stats(results['boot'])} |")
    print(f"| libvirt backend, real boot | {stats(results['libvirt'])} |")
    print(f"| libvirt backend, from its template | {stats(results['libvirt_template'])} |")
    print(f"| libvirt: image upload to the pool (once per host) | {stats(results['upload'])} |")
    print(f"libvirt boot / qemu boot: {libvirt / boot:.2f}x; "
          f"libvirt boot / qemu template: "
          f"{libvirt / statistics.median(results['template']):.1f}x; libvirt boot / libvirt "
          f"template: {libvirt / statistics.median(results['libvirt_template']):.1f}x")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="debian-12")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "pytest-kvm")
    parser.add_argument(
        "--cold-upload",
        action="store_true",
        help="delete the pool's copy of the image first, to time the upload",
    )
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside:
        measure(args)
        return
    from libvirtd import Libvirtd

    with tempfile.TemporaryDirectory(prefix="bench-libvirtd-") as tmp, Libvirtd(Path(tmp)) as d:
        argv = d.as_system([sys.executable, __file__, "--inside", "--image", args.image,
                       "--runs", str(args.runs), "--cache", str(args.cache),
                       *(["--cold-upload"] if args.cold_upload else [])])  # fmt: skip
        sys.exit(subprocess.run(argv, check=False).returncode)


if __name__ == "__main__":
    main()
