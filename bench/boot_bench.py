"""Per-test guest cost on the qemu backend, side by side with a hand-written QEMU command.

    .venv/bin/python bench/boot_bench.py --image debian-12 --runs 5

Reports median and spread (min..max) over the runs, interleaving the two paths so
that machine noise hits both alike. Phases for the plugin: overlay creation, QEMU
start to SSH-ready, fixture request to first command done, teardown.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from pytest_kvm import accel
from pytest_kvm.guest import Guest, GuestConfig
from pytest_kvm.images.store import resolve
from pytest_kvm.network import free_port
from pytest_kvm.run import RunContext
from pytest_kvm.seed import SeedConfig, write_seed
from pytest_kvm.ssh import KeyPair


def plugin_once(run: RunContext, config: GuestConfig) -> dict[str, float]:
    t0 = time.monotonic()
    guest = Guest(run, config)
    try:
        guest.start()
        guest.succeed("true")
        first_command = time.monotonic() - t0
    finally:
        t1 = time.monotonic()
        guest.close()
        teardown = time.monotonic() - t1
    return {
        "overlay": guest.boot_timings["overlay"],
        "qemu_start_to_ssh": guest.boot_timings["qemu_start"] + guest.boot_timings["ssh_ready"],
        "request_to_first_command": first_command,
        "teardown": teardown,
    }


def handwritten_once(image: Path, fmt: str, accel_name: str) -> dict[str, float]:
    """What a person would write by hand: qemu-img, a seed, qemu, and ssh in a loop."""
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        d = Path(tmp)
        key = KeyPair.generate().save(d / "key")
        host = KeyPair.generate()
        write_seed(
            SeedConfig("hand", "hand", key.public_openssh, host.private_openssh,
                       host.public_openssh),
            d / "seed.iso",
        )  # fmt: skip
        t0 = time.monotonic()
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", fmt, "-b", str(image),
             str(d / "disk.qcow2")],
            check=True,
        )  # fmt: skip
        port = free_port()
        argv = [
            "qemu-system-x86_64", "-machine", "q35", "-accel",
            "kvm" if accel_name == "kvm" else "tcg,thread=multi",
            "-cpu", "host" if accel_name == "kvm" else "max", "-m", "1024", "-smp", "2",
            "-display", "none", "-serial", f"file:{d / 'serial.log'}",
            "-drive", f"file={d / 'disk.qcow2'},if=virtio",
            "-drive", f"file={d / 'seed.iso'},if=virtio,format=raw,readonly=on",
            "-device", "virtio-rng-pci",
            "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22",
            "-device", "virtio-net-pci,netdev=n0",
        ]  # fmt: skip
        t_start = time.monotonic()
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            ssh = [
                "ssh", "-i", str(key.path), "-p", str(port), "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "ConnectTimeout=5", "-o", "LogLevel=ERROR", "root@127.0.0.1", "true",
            ]  # fmt: skip
            deadline = time.monotonic() + 900
            while time.monotonic() < deadline:
                if _banner(port) and subprocess.run(ssh, capture_output=True).returncode == 0:
                    break
                time.sleep(0.25)
            else:
                raise TimeoutError("hand-written guest never answered SSH")
            done = time.monotonic()
        finally:
            t1 = time.monotonic()
            proc.kill()
            proc.wait()
            teardown = time.monotonic() - t1
    return {
        "qemu_start_to_ssh": done - t_start,
        "request_to_first_command": done - t0,
        "teardown": teardown,
    }


def _banner(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.settimeout(2)
            return s.recv(4).startswith(b"SSH-")
    except OSError:
        return False


def summarize(name: str, runs: list[dict[str, float]]) -> list[str]:
    lines = []
    for key in runs[0]:
        values = [r[key] for r in runs]
        lines.append(
            f"| {name} | {key} | {statistics.median(values):.3f} | "
            f"{min(values):.3f}..{max(values):.3f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--image", default="debian-12")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "pytest-kvm"))
    args = parser.parse_args()
    image = resolve(args.image, Path(args.cache))
    choice = accel.choose("auto")
    run = RunContext(choice)
    config = GuestConfig(image=image)
    plugin_runs, hand_runs = [], []
    try:
        for i in range(args.runs):
            plugin_runs.append(plugin_once(run, config))
            hand_runs.append(handwritten_once(image.path, image.format, choice.name))
            print(f"run {i + 1}/{args.runs}: plugin {plugin_runs[-1]}  hand {hand_runs[-1]}",
                  flush=True)  # fmt: skip
    finally:
        run.close()
    p = statistics.median(r["request_to_first_command"] for r in plugin_runs)
    h = statistics.median(r["request_to_first_command"] for r in hand_runs)
    print(f"\n{time.strftime('%Y-%m-%d')} {platform.node()} {shutil.which('qemu-system-x86_64')}"
          f" accel={choice.name} image={image.name} runs={args.runs}")  # fmt: skip
    print("| path | phase | median s | min..max s |\n|---|---|---|---|")
    print("\n".join(summarize("plugin", plugin_runs) + summarize("hand-written", hand_runs)))
    print(f"\nplugin / hand-written, request to first command: {p / h:.3f} "
          f"(overhead {100 * (p / h - 1):+.1f}%)")  # fmt: skip


if __name__ == "__main__":
    main()
