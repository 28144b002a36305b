"""Inner pytest runs with real guests, each in a runtime dir of its own, and what they
left behind afterwards: QEMU processes, dirs, leases, tap devices."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_kvm.reaper import Lease, leases, reap
from tests.support.processes import qemu_pids

INNER_TIMEOUT = 600


def short(run_id: str) -> str:
    """The part of a run id that its dirs' names carry (guest names carry it whole)."""
    return run_id[:8]


def run_ids(runtime: Path, text: str = "") -> set[str]:
    """Run ids of inner runs (short): from their leases (while they exist), guest names
    or dir names."""
    ids = {m.group(1) for m in re.finditer(r"kvm-([0-9a-f]{16})-(?:main|gw\d+)-\d\d", text)}
    ids |= {m.group(1) for m in re.finditer(r"pytest-kvm-([0-9a-f]{8})-", text)}
    for lease in leases_under(runtime):
        ids.add(str(lease.data["run_id"]))
    for entry in runtime.glob("pytest-kvm-*"):
        ids.add(entry.name.split("-")[2])
    return {short(run_id) for run_id in ids}


def leases_under(runtime: Path) -> list[Lease]:
    """The leases of runs whose dirs are under ``runtime``."""
    return [
        lease
        for lease in leases()
        if str(lease.data.get("dir") or lease.data.get("workdir", "")).startswith(str(runtime))
    ]


def qemu_of(run_id: str) -> list[int]:
    """QEMU processes of the run ``run_id`` (the whole id, or its short start)."""
    return qemu_pids(f"guest=kvm-{run_id}")


def leftovers(runtime: Path, run_ids: set[str]) -> dict[str, list[str]]:
    """What the inner runs ``run_ids`` left: should be empty lists, every one."""
    assert run_ids, "no inner run was seen"
    left: dict[str, list[str]] = {"qemu": [], "dirs": [], "leases": [], "taps": []}
    for run_id in run_ids:
        left["qemu"] += [str(pid) for pid in qemu_of(run_id)]
        left["dirs"] += [str(p) for p in Path("/tmp").glob(f"pytest-kvm-{short(run_id)}-*")]
        left["leases"] += [
            str(lease.path)
            for lease in leases()
            if str(lease.data.get("run_id")).startswith(short(run_id))
        ]
    left["dirs"] += [str(p) for p in runtime.iterdir()]
    # Our tap devices are named after the guest: none of an inner run may be left.
    left["taps"] = [
        p.name
        for p in Path("/sys/class/net").iterdir()
        if any(run_id in p.name for run_id in run_ids)
    ]
    return left


NOTHING: dict[str, list[str]] = {"qemu": [], "dirs": [], "leases": [], "taps": []}


def default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class InnerRuns:
    """Inner pytest runs started in the background (``start``) with ``args`` and the
    runtime dir ``runtime``; ``stop`` kills what still runs and reaps what they left."""

    def __init__(self, pytester: pytest.Pytester, runtime: Path, args: list[str]) -> None:
        self.pytester = pytester
        self.runtime = runtime
        self.args = [*args, "-p", "no:cacheprovider", "-o", "faulthandler_timeout=300"]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.outputs: dict[int, Path] = {}
        self.env: dict[str, str] = {}

    def start(self, *extra: str, cwd: Path | None = None) -> subprocess.Popen[bytes]:
        out = (cwd or self.pytester.path) / f"out-{len(self.procs)}.txt"
        with out.open("wb") as sink:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pytest", *self.args, *extra],
                cwd=cwd or self.pytester.path,
                stdout=sink,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env, "PYTEST_KVM_RUNTIME_DIR": str(self.runtime)},
                # Ctrl-C as from a terminal: a suite started in the background by a shell
                # without job control inherits SIGINT ignored, and Python then installs
                # no KeyboardInterrupt handler, so the Ctrl-C test would see a pass.
                preexec_fn=default_sigint,
            )
        self.procs.append(proc)
        self.outputs[proc.pid] = out
        return proc

    def output(self, proc: subprocess.Popen[bytes]) -> str:
        return self.outputs[proc.pid].read_text(errors="replace")

    def wait(self, proc: subprocess.Popen[bytes]) -> int:
        try:
            return proc.wait(INNER_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"inner run hung:\n{self.output(proc)[-3000:]}") from None

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        # Whatever a failed test left (kept guests too), and only that.
        mine = str(self.runtime)
        reap(
            include_kept=True,
            select=lambda lease: str(
                lease.data.get("dir") or lease.data.get("workdir", "")
            ).startswith(mine),
        )
