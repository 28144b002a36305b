"""The ``pytest-kvm`` command: build and list catalog images, check the machine."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from . import __version__
from .config import default_cache_dir
from .doctor import cmd_doctor
from .errors import KvmError


def _progress(start: float) -> object:
    def show(message: str) -> None:
        print(f"[{time.monotonic() - start:6.1f}s] {message}", flush=True)

    return show


def cmd_image_build(args: argparse.Namespace) -> int:
    from .images.builder import build_image
    from .images.recipe import load_recipe
    from .images.store import build_cached, is_downloaded

    if is_downloaded(args.name):
        print(
            f"pytest-kvm: {args.name} is downloaded, not built: pytest-kvm image pull {args.name}",
            file=sys.stderr,
        )
        return 2
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
    _list_downloads(cache)
    images = cache / "images"
    known = {catalog_path(n, cache) for n in catalog_names()}
    for path in sorted(images.glob("*.qcow2")) if images.is_dir() else []:
        if path not in known:
            size = f"{path.stat().st_size / 2**20:.0f}M"
            print(f"{path.stem:<16} {'stale':<10} {size:>8}  {path} (older recipe)")
    from .template import list_templates, snapshot_of, stale_reason

    found = list_templates(cache / "templates")
    kinds = [(path, used, snapshot_of(path)) for path, used in found]
    snapshots = [(path, used, of) for path, used, of in kinds if of is not None]
    templates = [(path, used) for path, used, of in kinds if of is None]
    if templates:
        print("\nTEMPLATES (booted guests that tests are restored from)")
        for path, used in templates:
            stale = stale_reason(path)
            print(f"  {path}  {used / 2**20:.0f}M" + (f"  stale: {stale}" if stale else ""))
    if snapshots:
        print("\nSNAPSHOTS (kvm_snapshot: prepared states, each over a base template)")
        print(f"  {'NAME':<16} {'SIZE':>8}  BASE")
        for path, used, (name, base) in snapshots:
            stale = stale_reason(path)
            print(
                f"  {name:<16} {used / 2**20:>7.0f}M  {base}"
                + (f"  stale: {stale}" if stale else "")
            )
            print(f"  {'':<16} {'':>8}  {path}")
    if found:
        print("`pytest-kvm template prune` removes stale ones (--all: every one)")
    layers = sorted((cache / "layers").glob("*.qcow2"))
    if layers:
        print("\nCUSTOMISATION LAYERS (files=, hostname=, run= applied with libguestfs)")
        for path in layers:
            print(f"  {path}  {path.stat().st_size / 2**20:.0f}M")
    return 0


def _list_downloads(cache: Path) -> None:
    """Downloaded catalog images (images/catalog/cloud/) and other downloads in the cache."""
    from .images.download import cached, catalog_source, current_file
    from .images.recipe import catalog_names, download_names

    keys = set()
    for name in download_names():
        if name in catalog_names():
            continue  # a local recipe of the same name wins
        source = catalog_source(name)
        keys.add(source.key)
        path = cached(source, cache)
        state = "cached" if path else "not cached"
        size = f"{path.stat().st_size / 2**20:.0f}M" if path else "-"
        print(f"{name:<16} {state:<10} {size:>8}  download {source.url}")
    downloads = cache / "downloads"
    for directory in sorted(downloads.iterdir()) if downloads.is_dir() else []:
        if directory.name in keys or not directory.is_dir():
            continue
        found = current_file(directory)
        if found is not None:
            size = f"{found.stat().st_size / 2**20:.0f}M"
            print(f"{directory.name:<16} {'cached':<10} {size:>8}  {found}")


def cmd_image_pull(args: argparse.Namespace) -> int:
    from .images.store import check_spec, classify, fetch_image, is_downloaded

    if classify(args.image) != "url" and not is_downloaded(args.image):
        print(
            f"pytest-kvm: {args.image!r} is not a URL or a downloaded catalog image "
            "(`pytest-kvm image list` shows them)",
            file=sys.stderr,
        )
        return 2
    check_spec(args.image)
    image = fetch_image(args.image, Path(args.cache), _progress(time.monotonic()))  # type: ignore[arg-type]
    print(f"{image.path} ({image.format}, {image.virtual_size / 2**20:.0f} MiB virtual)")
    return 0


def cmd_reap(args: argparse.Namespace) -> int:
    from .reaper import lease_dir, leases, reap

    directory = lease_dir()
    if args.dry_run:
        everything = leases(directory)
        found = [lease for lease in everything if not lease.owner_alive]
        for lease in found:
            print(f"would reap {lease.describe()}{' (kept)' if lease.kept else ''}")
        for lease in everything:
            if lease.foreign:
                print(
                    f"left alone (another host or container): {lease.describe()}: {lease.foreign}"
                )
        print(f"{len(found)} lease(s) of dead runs in {directory}")
        return 0
    result = reap(include_kept=not args.leave_kept, directory=directory)
    if result.busy:
        print("another process is reaping right now; try again in a moment", file=sys.stderr)
        return 1
    for line in result.reaped:
        print(f"reaped {line}")
    for line in result.kept:
        print(f"left running (kept): {line}")
    for line in result.foreign:
        print(f"left alone (another host or container): {line}")
    if not result.reaped:
        print("nothing to reap: every lease belongs to a live run or a kept guest")
    return 0


def cmd_template_prune(args: argparse.Namespace) -> int:
    from .customize import prune_layers
    from .images.download import prune as prune_downloads
    from .template import prune

    cache = Path(args.cache)
    # Superseded downloads first: what was made from them is stale then, and goes too.
    gone, busy = prune_downloads(cache)
    removed = [(p, "superseded by a newer download") for p in gone]
    kept = [(p, "an older download in use by a running test session") for p in busy]
    templates = prune(cache / "templates", everything=args.all)
    removed += templates.removed
    kept += templates.in_use
    removed += [(p, "its base image is gone") for p in prune_layers(cache)]
    for path, why in removed:
        print(f"removed {path}: {why}")
    for path, why in kept:
        print(f"kept {path}: {why}")
    pruned = [_prune_pool(uri, args.pool, cache / "templates") for uri in _prune_uris(args)]
    if not removed and not any(pruned):
        print("nothing to remove")
    return 0


def _prune_uris(args: argparse.Namespace) -> list[str]:
    """The libvirt URIs whose pools ``template prune`` prunes: --uri, else those of
    PYTEST_KVM_URI (as pytest's --kvm-uri); none unless asked, so that a prune never
    starts a session libvirtd or judges a shared pool by one user's cache unbidden."""
    if args.no_libvirt:
        return []
    return args.uri or os.environ.get("PYTEST_KVM_URI", "").split()


def _prune_pool(uri: str, pool: str | None, templates: Path) -> bool:
    """Prune the libvirt pool of ``uri`` and say what went and what stayed; one line
    if libvirt cannot be reached there. Whether anything was removed."""
    from .backends.libvirt.prune import prune_uri
    from .backends.libvirt.storage import DEFAULT_POOL
    from .template import pool_copies

    name = pool or os.environ.get("PYTEST_KVM_POOL") or DEFAULT_POOL
    try:
        result = prune_uri(uri, name, lambda: pool_copies(templates))
    except KvmError as exc:
        # The libvirt layer names the pytest option (--kvm-uri); here it came from
        # --uri or PYTEST_KVM_URI.
        reason = str(exc).removeprefix(f"--kvm-uri {uri}: ")
        print(f"libvirt pool {name!r} at {uri} not pruned: {reason}")
        return False
    for volume, why in result.removed:
        print(f"removed volume {volume} from pool {name!r} at {uri}: {why}")
    for volume, why in result.kept:
        print(f"kept volume {volume} in pool {name!r} at {uri}: {why}")
    return bool(result.removed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pytest-kvm", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
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
    pull = image.add_parser(
        "pull", help="download a catalog cloud image or a URL into the cache (checksummed)"
    )
    pull.add_argument("image", help="a downloaded catalog name (ubuntu-24.04) or a URL")
    pull.set_defaults(func=cmd_image_pull)
    template = sub.add_parser("template", help="booted templates in the cache").add_subparsers(
        dest="template_command", required=True
    )
    pruning = template.add_parser(
        "prune",
        help="remove stale and half-made templates, layers whose base is gone, "
        "superseded downloads, and copies of templates no longer there in a libvirt "
        "pool; what a running session uses stays",
    )
    pruning.add_argument("--all", action="store_true", help="remove every template")
    pruning.add_argument(
        "--uri",
        action="append",
        help="also prune the copies of templates in this libvirt URI's pool (repeatable; "
        "default: those of $PYTEST_KVM_URI; without either, no pool is pruned)",
    )
    pruning.add_argument(
        "--pool", help="the libvirt storage pool there (default: $PYTEST_KVM_POOL, pytest-kvm)"
    )
    pruning.add_argument("--no-libvirt", action="store_true", help="leave libvirt's pools alone")
    pruning.set_defaults(func=cmd_template_prune)
    doctor = sub.add_parser("doctor", help="what works on this machine")
    doctor.add_argument(
        "--quick", action="store_true", help="do not launch a libguestfs appliance (~15 s)"
    )
    doctor.set_defaults(func=cmd_doctor)
    reaping = sub.add_parser(
        "reap",
        help="destroy guests and remove overlays, sockets and dirs left by dead runs",
        description="Runs whose process is gone: kill their QEMU, destroy their libvirt "
        "domains, delete their tap devices and their dirs. Live runs are never touched. "
        "Guests kept by --kvm-keep-on-failure are ended too, unless --leave-kept.",
    )
    reaping.add_argument("--dry-run", action="store_true", help="list, remove nothing")
    reaping.add_argument(
        "--leave-kept", action="store_true", help="leave --kvm-keep-on-failure guests running"
    )
    reaping.set_defaults(func=cmd_reap)
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
