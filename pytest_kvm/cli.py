"""The ``pytest-kvm`` command: build and list catalog images, check the machine."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import accel
from .config import default_cache_dir
from .errors import KvmError


def _progress(start: float) -> object:
    def show(message: str) -> None:
        print(f"[{time.monotonic() - start:6.1f}s] {message}", flush=True)

    return show


def cmd_image_build(args: argparse.Namespace) -> int:
    from .images.builder import build_image
    from .images.recipe import load_recipe
    from .images.store import build_cached

    start = time.monotonic()
    show = _progress(start)
    if args.output:
        out = Path(args.output)
        if out.exists() and not args.force:
            print(f"pytest-kvm: {out} exists; pass --force to replace it", file=sys.stderr)
            return 2
        build_image(load_recipe(args.name), out, mirror=args.mirror, progress=show)  # type: ignore[arg-type]
        path = out
    else:
        if args.mirror:
            print("pytest-kvm: --mirror applies with -o; set PYTEST_KVM_MIRROR", file=sys.stderr)
            return 2
        path = build_cached(args.name, Path(args.cache), show).path  # type: ignore[arg-type]
    print(f"{path} ({path.stat().st_size / 2**20:.0f} MiB on disk)")
    return 0


def cmd_image_list(args: argparse.Namespace) -> int:
    from .images.recipe import catalog_names, load_recipe
    from .images.store import catalog_path

    cache = Path(args.cache)
    print(f"{'NAME':<16} {'STATE':<10} {'SIZE':>8}  SOURCE")
    for name in catalog_names():
        path = catalog_path(name, cache)
        state = "built" if path.exists() else "not built"
        size = f"{path.stat().st_size / 2**20:.0f}M" if path.exists() else "-"
        print(f"{name:<16} {state:<10} {size:>8}  recipe {load_recipe(name).path}")
    images = cache / "images"
    known = {catalog_path(n, cache) for n in catalog_names()}
    for path in sorted(images.glob("*.qcow2")) if images.is_dir() else []:
        if path not in known:
            size = f"{path.stat().st_size / 2**20:.0f}M"
            print(f"{path.stem:<16} {'stale':<10} {size:>8}  {path} (older recipe)")
    from .template import list_templates, stale_reason

    templates = list_templates(cache / "templates")
    if templates:
        print("\nTEMPLATES (booted guests that tests are restored from)")
        for path, used in templates:
            stale = stale_reason(path)
            print(f"  {path}  {used / 2**20:.0f}M" + (f"  stale: {stale}" if stale else ""))
        print("`pytest-kvm template prune` removes stale ones (--all: every one)")
    layers = sorted((cache / "layers").glob("*.qcow2"))
    if layers:
        print("\nCUSTOMISATION LAYERS (files=, hostname=, run= applied with libguestfs)")
        for path in layers:
            print(f"  {path}  {path.stat().st_size / 2**20:.0f}M")
    return 0


def cmd_template_prune(args: argparse.Namespace) -> int:
    from .customize import prune_layers
    from .template import prune

    removed = prune(Path(args.cache) / "templates", everything=args.all)
    removed += [(p, "its base image is gone") for p in prune_layers(Path(args.cache))]
    for path, why in removed:
        print(f"removed {path}: {why}")
    if not removed:
        print("nothing to remove")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    ok = True

    def line(good: bool, what: str, detail: str) -> None:
        print(f"[{'ok' if good else '!!'}] {what}: {detail}")

    for tool, package in (
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("qemu-img", "qemu-utils"),
        ("qemu-nbd", "qemu-utils"),
        ("mmdebstrap", "mmdebstrap"),
        ("grub-mkimage", "grub-common"),
        ("mkfs.ext4", "e2fsprogs"),
        ("sfdisk", "fdisk"),
    ):
        found = shutil.which(tool)
        if found and tool.startswith("qemu"):
            version = subprocess.run([tool, "--version"], capture_output=True, text=True)
            detail = version.stdout.splitlines()[0] if version.stdout else found
        else:
            detail = found or f"missing: apt-get install {package}"
        line(bool(found), tool, detail)
        ok = ok and bool(found)
    choice = accel.choose("auto")
    line(True, "accelerator", f"{choice.name} ({choice.reason})")
    try:
        import guestfs  # noqa: F401

        line(True, "libguestfs", "python binding importable (python3-guestfs)")
    except ImportError:
        line(False, "libguestfs", "optional; apt-get install python3-guestfs")
    line(*_libvirt_status())
    cache = Path(args.cache)
    probe = cache if cache.exists() else cache.parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free / 2**30
    line(free > 5, "cache", f"{cache}: {free:.1f} GiB free")
    return 0 if ok else 1


def _libvirt_status() -> tuple[bool, str, str]:
    """(usable, "libvirt", detail): optional, for --kvm-backend libvirt."""
    from .backends.libvirt import connect, load_libvirt
    from .config import default_uri
    from .errors import KvmError

    try:
        load_libvirt()
    except KvmError as exc:
        return False, "libvirt", f"optional; {exc}"
    uri = default_uri()
    try:
        conn = connect(uri)
        version = conn.getLibVersion()
    except KvmError as exc:
        return False, "libvirt", f"optional; {exc}"
    v = f"{version // 1_000_000}.{version // 1000 % 1000}.{version % 1000}"
    return True, "libvirt", f"{uri} answers (libvirt {v})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pytest-kvm", description=__doc__)
    parser.add_argument("--cache", default=str(default_cache_dir()), help="image cache dir")
    sub = parser.add_subparsers(dest="command", required=True)
    image = sub.add_parser("image", help="catalog images").add_subparsers(
        dest="image_command", required=True
    )
    build = image.add_parser("build", help="build a catalog image locally")
    build.add_argument("name")
    build.add_argument("-o", "--output", help="write here instead of the cache")
    build.add_argument("--mirror", help="Debian mirror URL (default: from apt sources)")
    build.add_argument("--force", action="store_true", help="replace an existing -o file")
    build.set_defaults(func=cmd_image_build)
    listing = image.add_parser("list", help="catalog and cache")
    listing.set_defaults(func=cmd_image_list)
    template = sub.add_parser("template", help="booted templates in the cache").add_subparsers(
        dest="template_command", required=True
    )
    pruning = template.add_parser(
        "prune", help="remove stale and half-made templates, and layers whose base is gone"
    )
    pruning.add_argument("--all", action="store_true", help="remove every template")
    pruning.set_defaults(func=cmd_template_prune)
    doctor = sub.add_parser("doctor", help="what works on this machine")
    doctor.set_defaults(func=cmd_doctor)
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except KvmError as exc:
        print(f"pytest-kvm: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pytest-kvm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
