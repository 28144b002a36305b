"""libguestfs costs: appliance launch, a customisation built against cached, one
handle reused against one per call, and a journal read from a stopped guest's disk.

    .venv/bin/python bench/guestfs_bench.py --image debian-12 --runs 3

1. Launch: open and close a read-only handle on the image (appliance start, OS
   inspection, mounts), ``--runs`` times.
2. Customisation layer (2 files, a host name, 1 command): built (a new content
   token each run, so really built) against asked for again (cached).
3. Three file reads from one disk: one ``GuestDisk`` (handle kept) against a new
   handle per read.
4. The journal of the image's last boot through ``GuestDisk.journal()``.
"""

from __future__ import annotations

import argparse
import platform
import secrets
import statistics
import tempfile
import time
from pathlib import Path

from pytest_kvm import accel
from pytest_kvm.customize import Customization, DiskHandle, DiskSource, GuestDisk, customized_image
from pytest_kvm.images.store import resolve


def stats(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} | {min(values):.3f}..{max(values):.3f} | {len(values)}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--image", default="debian-12")
    parser.add_argument("--cache", default=str(Path.home() / ".cache/pytest-kvm"))
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    image = resolve(args.image, Path(args.cache), progress=lambda _: None)
    force_tcg = accel.choose("auto").name != "kvm"
    source = DiskSource.of(image)
    rows: dict[str, list[float]] = {}

    def timed(what: str, action) -> None:  # type: ignore[no-untyped-def]
        t0 = time.monotonic()
        action()
        rows.setdefault(what, []).append(time.monotonic() - t0)

    files = ("/etc/hostname", "/etc/os-release", "/etc/passwd")
    with tempfile.TemporaryDirectory(prefix="bench-guestfs-") as tmp:
        cache = Path(tmp)
        for run in range(args.runs):
            print(f"run {run + 1}/{args.runs}", flush=True)

            def launch() -> None:
                with DiskHandle(source, readonly=True, force_tcg=force_tcg):
                    pass

            timed("appliance launch + inspect + mount, read-only", launch)
            custom = Customization.build(
                files={"/etc/bench-token": secrets.token_hex(8), "/etc/b": "b\n"},
                hostname="bench",
                run=["echo ran > /etc/bench-ran"],
            )
            timed("customisation layer, built", lambda c=custom: customized_image(
                image, c, cache, force_tcg, progress=lambda _: None))  # fmt: skip
            timed("customisation layer, cached", lambda c=custom: customized_image(
                image, c, cache, force_tcg, progress=lambda _: None))  # fmt: skip

            def reused() -> None:
                disk = GuestDisk(source, force_tcg, "bench")
                try:
                    for path in files:
                        disk.read_text(path)
                finally:
                    disk.close()

            def per_call() -> None:
                for path in files:
                    disk = GuestDisk(source, force_tcg, "bench")
                    try:
                        disk.read_text(path)
                    finally:
                        disk.close()

            timed("3 file reads, one handle (GuestDisk)", reused)
            timed("3 file reads, a handle per read", per_call)

            def journal() -> None:
                disk = GuestDisk(source, force_tcg, "bench")
                try:
                    disk.journal()
                finally:
                    disk.close()

            timed("journal of the last boot (launch included)", journal)
    print(f"\nimage {image.name}; accel {'tcg' if force_tcg else 'kvm'}; {platform.node()}")
    print("| what | median s | min..max s | runs |\n|---|---|---|---|")
    for what, values in rows.items():
        print(f"| {what} | {stats(values)} |")
    built = statistics.median(rows["customisation layer, built"])
    cached = statistics.median(rows["customisation layer, cached"])
    one = statistics.median(rows["3 file reads, one handle (GuestDisk)"])
    many = statistics.median(rows["3 file reads, a handle per read"])
    print(f"\nbuilt / cached layer: {built / cached:.0f}x; handle per read / one handle: "
          f"{many / one:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
