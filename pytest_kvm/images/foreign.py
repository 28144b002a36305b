"""The configure stage of a foreign-architecture image build, in a system-emulated guest.

A root file system for arm64 or riscv64 is unpacked on the host without running
any of its code (``debootstrap --foreign``), then configured (``debootstrap
--second-stage``: every package's maintainer scripts, the kernel's initramfs)
by the architecture's own code. Under qemu-user every process of that stage
translates its code anew, which took about an hour per image on a 2-core
machine; a ``qemu-system-* -M virt`` guest keeps its translated code across
processes and does the same work in minutes.

The guest boots the unpacked tree's own kernel, with the whole tree as its
initramfs (a newc cpio, :mod:`pytest_kvm.images.cpio`): no disk image, no
modules to load before the work starts. A shell script, the guest's ``/init``,
runs the second stage in RAM, writes the result as a tar stream onto a raw
virtio disk, prints a result line on the console and reboots, which ends the
emulator (``-no-reboot``).
The host reads the tar back into a directory for the usual configure,
filesystem and bootloader phases.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import ImageError
from ..util import tail as tail_file

Progress = Callable[[str], None]

#: The console line the guest's script prints last: "ok", or "failed: WHAT".
RESULT_PREFIX = "pytest-kvm-stage: result "
#: Lines of the script's own progress.
STAGE_PREFIX = "pytest-kvm-stage: "
#: The name of the script in the tree (the kernel runs it as PID 1).
INIT = "init"
#: Files the script puts in place only for the stage and removes afterwards.
POLICY_RC_D = "usr/sbin/policy-rc.d"
DPKG_UNSAFE_IO = "etc/dpkg/dpkg.cfg.d/pytest-kvm-build"

_THIN_INTERVAL = 5.0  # seconds between forwarded debootstrap lines
_QUIET_INTERVAL = 30.0  # a "still running" line after this long without one
#: A guest is stopped once its emulator has used this many CPU-seconds: a
#: measure of work done, whatever the host's load (at load 15-20 on 2 cores the
#: emulator here got a quarter of one core, so a wall-clock limit fit for a
#: quiet machine stopped healthy builds).
STAGE_CPU_LIMIT = 2 * 3600.0
#: And after this long in any case (a guest that waits, using no CPU).
STAGE_DEADLINE = 6 * 3600.0


@dataclass(frozen=True)
class ForeignArch:
    """How to run a Debian architecture's code in a ``virt`` guest."""

    debian: str  # "arm64"
    qemu: str  # the emulator binary
    machine: tuple[str, ...]  # -M and -cpu (and firmware) arguments
    console: str  # the serial console's device name in the guest
    kernel_glob: str  # the kernel in the linux-image package, relative to its root


ARCHES: dict[str, ForeignArch] = {
    "arm64": ForeignArch(
        debian="arm64",
        qemu="qemu-system-aarch64",
        # cortex-a72, not max: max emulates pointer authentication, which costs
        # TCG dearly on every function call and return
        machine=("-M", "virt", "-cpu", "cortex-a72"),
        console="ttyAMA0",
        kernel_glob="boot/vmlinuz-*",
    ),
    "riscv64": ForeignArch(
        debian="riscv64",
        qemu="qemu-system-riscv64",
        # QEMU's own OpenSBI (Debian's opensbi package) starts the kernel in S-mode
        machine=("-M", "virt", "-bios", "default"),
        console="ttyS0",
        kernel_glob="boot/vmlinu[xz]-*",
    ),
}


def qemu_argv(
    arch: ForeignArch,
    qemu: str,
    *,
    kernel: Path,
    initrd: Path,
    output: Path,
    console_log: Path,
    memory_mib: int,
    cpus: int,
) -> list[str]:
    """The emulator's command line for the stage: no network, no display, no
    reboot; the console into a file; the output disk as virtio-blk on PCI."""
    return [
        qemu,
        *arch.machine,
        "-accel",
        "tcg,thread=multi,tb-size=512",
        "-smp",
        str(cpus),
        "-m",
        str(memory_mib),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-monitor",
        "none",
        "-no-reboot",
        "-chardev",
        f"file,id=console,path={console_log}",
        "-serial",
        "chardev:console",
        "-kernel",
        str(kernel),
        "-initrd",
        str(initrd),
        "-append",
        f"console={arch.console} rdinit=/{INIT} loglevel=4 panic=-1",
        "-drive",
        f"file={output},format=raw,if=none,id=out,cache=unsafe",
        "-device",
        "virtio-blk-pci,drive=out",
    ]


def stage_script(tar_excludes: Sequence[str] = ()) -> str:
    """The guest's ``/init``: second stage, tar onto /dev/vda, result line, power off.

    Everything runs in the initramfs's tmpfs; the disk is written only at the
    end. ``tar_excludes``: relative paths (``./x``) left out of the result."""
    excludes = " ".join(shlex.quote(f"--exclude={e}") for e in (f"./{INIT}", *tar_excludes))
    return f"""#!/bin/sh
# Written by pytest-kvm's image builder: the configure stage of a
# foreign-architecture image, run as PID 1 of a throwaway guest.
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive
say() {{ echo "{STAGE_PREFIX}$*"; }}
finish() {{
    mount -t proc proc /proc 2>/dev/null
    sync
    say "result $1"
    # a reboot ends the emulator (-no-reboot); sysrq's power-off is not there on
    # arm64 with PSCI's sys-off handler. If even this fails, init exits: the
    # kernel panics and reboots at once (panic=-1).
    echo b >/proc/sysrq-trigger
    sleep 30
    exit 1
}}
mount -t devtmpfs devtmpfs /dev 2>/dev/null
# the initramfs's tmpfs may use half the RAM by default: the stage needs more
mount -o remount,size=90% / 2>/dev/null
say "second stage: debootstrap --second-stage (every package's scripts, the initramfs)"
started=$(date +%s)
/debootstrap/debootstrap --second-stage || finish "failed: debootstrap --second-stage (exit $?)"
say "second stage: done in $(( $(date +%s) - started ))s"
mount -t proc proc /proc 2>/dev/null
mount -t sysfs sysfs /sys 2>/dev/null
rm -f /{POLICY_RC_D} /{DPKG_UNSAFE_IO}
rm -f /var/cache/apt/archives/*.deb
for m in virtio_pci virtio_blk; do modprobe "$m" 2>/dev/null; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 60 ]; do sleep 1; i=$((i + 1)); done
[ -b /dev/vda ] || finish "failed: no /dev/vda to write the result to"
say "writing the root file system to /dev/vda (tar)"
tar --create --file=/dev/vda --numeric-owner --xattrs --xattrs-include='*' \\
    --one-file-system --directory=/ {excludes} . \\
    || finish "failed: tar onto /dev/vda (exit $?)"
finish ok
"""


def find_result(console: str) -> str | None:
    """The guest's result (``ok`` or ``failed: ...``) from its console, or None."""
    for line in reversed(console.splitlines()):
        line = line.strip()
        if line.startswith(RESULT_PREFIX):
            return line[len(RESULT_PREFIX) :].strip()
    return None


def find_kernel(unpacked: Path, arch: ForeignArch) -> Path:
    """The kernel image in an unpacked linux-image package."""
    found = sorted(unpacked.glob(arch.kernel_glob))
    if not found:
        raise ImageError(f"no {arch.kernel_glob} in the kernel package for {arch.debian}")
    return found[-1]


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU-seconds of a running process (0.0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # after the command's ")": state is field 3, utime 14 and stime 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


_FORWARD_RE = re.compile(r"^(I: (Configuring|Installing|Unpacking) |W: |E: |\[)")


class StageGuest:
    """One run of the stage's guest; :meth:`run` returns when it has powered off."""

    def __init__(
        self,
        argv: Sequence[str],
        console_log: Path,
        emulator_log: Path,
        *,
        name: str,
        progress: Progress,
        deadline: float = STAGE_DEADLINE,
        cpu_limit: float = STAGE_CPU_LIMIT,
    ) -> None:
        self.argv = list(argv)
        self.console_log = console_log
        self.emulator_log = emulator_log
        self.name = name
        self.progress = progress
        self.deadline = deadline
        self.cpu_limit = cpu_limit
        self.proc: subprocess.Popen[bytes] | None = None
        self.cpu_seconds = 0.0

    def run(self) -> None:
        self.console_log.touch()
        self.progress(f"configure stage: {shlex.join(self.argv)}")
        started = time.monotonic()
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        try:
            with open(self.emulator_log, "wb") as log:
                self.proc = subprocess.Popen(
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        except OSError as exc:
            raise ImageError(f"building {self.name!r}: cannot run {self.argv[0]}: {exc}") from exc
        try:
            self._follow(started)
        finally:
            self.stop()
        assert self.proc is not None
        console = self.console_log.read_text(errors="replace")
        result = find_result(console)
        elapsed = time.monotonic() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        #: the emulator's CPU seconds: what the stage costs whatever the host's load
        self.cpu_seconds = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
        self.progress(
            f"configure stage: the guest ran {elapsed:.0f}s, using {self.cpu_seconds:.0f} "
            f"CPU-seconds on the host (load {os.getloadavg()[0]:.1f})"
        )
        if result != "ok":
            emulator = self.emulator_log.read_text(errors="replace")[-2000:]
            what = (
                f"the guest reported: {result}"
                if result
                else f"the guest stopped (exit {self.proc.returncode}) without a result"
            )
            raise ImageError(
                f"building {self.name!r}: the configure stage failed after {elapsed:.0f}s: "
                f"{what}\n{emulator}"
                f"console tail ({self.console_log}):\n{tail_file(self.console_log, 40)}"
            )

    def _follow(self, started: float) -> None:
        assert self.proc is not None
        offset = 0
        pending = ""
        last_shown = last_thin = started
        last_line = ""
        while self.proc.poll() is None:
            time.sleep(1.0)
            now = time.monotonic()
            cpu = process_cpu_seconds(self.proc.pid)
            if now - started > self.deadline or cpu > self.cpu_limit:
                raise ImageError(
                    f"building {self.name!r}: the configure stage's guest still runs after "
                    f"{now - started:.0f}s and {cpu:.0f} CPU-seconds (limits {self.deadline:.0f}s, "
                    f"{self.cpu_limit:.0f} CPU-seconds); stopped. "
                    f"Console tail ({self.console_log}):\n" + tail_file(self.console_log, 40)
                )
            with open(self.console_log, "rb") as f:
                f.seek(offset)
                chunk = f.read()
            offset += len(chunk)
            pending += chunk.decode(errors="replace").replace("\r", "\n")
            *lines, pending = pending.split("\n")
            for line in (raw.strip() for raw in lines):
                if not line:
                    continue
                last_line = line
                if line.startswith(STAGE_PREFIX) or line.startswith(("E: ", "W: ")):
                    self.progress(f"configure stage: {line.removeprefix(STAGE_PREFIX)}")
                    last_shown = now
                elif _FORWARD_RE.match(line) and now - last_thin >= _THIN_INTERVAL:
                    self.progress(f"configure stage: {line} ({now - started:.0f}s)")
                    last_shown = last_thin = now
            if now - last_shown >= _QUIET_INTERVAL:
                self.progress(
                    f"configure stage: ... still running ({now - started:.0f}s, "
                    f"{cpu:.0f} CPU-seconds, load {os.getloadavg()[0]:.1f}), last: {last_line}"
                )
                last_shown = now

    def stop(self) -> None:
        """End the emulator (by its PID) if it still runs; idempotent."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
            try:
                proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue
