"""A guest restored from a template: a fresh overlay over the template's disk, its
saved state, then made its own machine (time, host name, vlan NICs) through qemu-ga
or SSH. Also the other side: saving a booted guest's state as a template."""

from __future__ import annotations

import contextlib
import shlex
import shutil
import subprocess
import time
from pathlib import Path

from ..backends.base import Drive, Machine
from ..errors import GuestError
from ..images.overlay import create_overlay
from ..qga import GuestAgentError
from ..util import Background
from .agent import agent_wait
from .commands import Commands
from .config import BootPlan, GuestConfig, SavedGuest
from .connection import Connection
from .disk import Disk
from .launch import Launcher
from .nics import Nics
from .state import GuestState, tail_text


class Restore:
    """Restore ``template``'s saved state over a fresh overlay, then make it this guest."""

    def __init__(
        self,
        config: GuestConfig,
        state: GuestState,
        template: SavedGuest,
        parts: tuple[Disk, Nics, Launcher, Connection, Commands],
        plan: BootPlan | None = None,
    ) -> None:
        self._config = config
        self._state = state
        self._template = template
        self._plan = plan  # a prepared snapshot's build: its disk and RAM are kept
        self._disk, self._nics, self._launcher, self._connection, self._commands = parts

    def start(self) -> None:
        state, template, timings = self._state, self._template, self._state.boot_timings
        assert state.workdir is not None
        scale = state.timeout_scale
        t0 = time.monotonic()
        where = self._plan.dir if self._plan else state.workdir
        overlay = create_overlay(template.disk.absolute(), "qcow2", where / "disk.qcow2")
        self._disk.overlay = overlay
        self._connection.host_key = template.host_key
        # The console log starts with the template's boot, so it is whole from power-on.
        log = state.workdir / "serial.log"
        shutil.copyfile(template.serial_log, log)
        with log.open("a") as out:
            out.write(f"\n[pytest-kvm] {state.name}: restored from template {template.name}\n")
        timings["overlay"] = time.monotonic() - t0
        t1 = time.monotonic()
        drives = (Drive(overlay, "qcow2"), Drive(template.seed, "raw", readonly=True))
        ram, shared = template.ram, False
        if self._plan:  # its own copy of the template's RAM, written through, kept
            ram, shared = copy_ram(template.ram, self._plan.dir / "ram"), True
        self._launcher.launch(drives, ram_file=ram, ram_shared=shared,
                              incoming=template.state)  # fmt: skip
        timings["restore"] = time.monotonic() - t1
        t2 = time.monotonic()
        # The guest agent makes it this guest while SSH shakes hands.
        adopt = Background(self._adopt_by_agent, "adopt-by-agent") if template.agent else None
        self._connection.connect(time.monotonic() + 60 * scale, waited=60 * scale)
        timings["ssh_ready"] = time.monotonic() - t2
        t3 = time.monotonic()
        if adopt is None or adopt.join(90 * scale) is not None:  # over SSH
            result = self._commands.run(self._adopt_script(), timeout=60)
            if result.exit_status != 0:
                raise GuestError(
                    f"{state.what}: could not make the restored clone its own machine "
                    f"(exit {result.exit_status}): {tail_text(result.stderr or result.stdout)}",
                    state.name,
                )
        timings["adopt"] = time.monotonic() - t3

    def _hostname(self) -> str:
        return self._config.hostname or self._state.name[:63]

    def _adopt_script(self) -> str:
        """Make a restored clone its own machine: the host's time and its own hostname.

        The kernel's random pool reseeds itself: QEMU gives every start a new VM
        generation ID (vmgenid). On user networking the clone keeps the template's
        MAC: the slirp ARP and DHCP tables restored with it hold that MAC, and a
        guest that changes its MAC at run time loses its network."""
        hostname = shlex.quote(self._hostname())
        return "\n".join(
            [
                "set -e",
                f"date -u -s @{time.time():.6f} >/dev/null",
                f"hostname {hostname}",
                f"printf '%s\\n' {hostname} >/etc/hostname",
                # cloud-init would put the template's hostname back at the next boot.
                "if [ -d /etc/cloud/cloud.cfg.d ]; then",
                "  printf 'preserve_hostname: true\\n' "
                ">/etc/cloud/cloud.cfg.d/99-pytest-kvm-clone.cfg",
                "fi",
            ]
        )

    def _adopt_by_agent(self) -> None:
        """The same as ``_adopt_script`` through qemu-ga, with one process started in
        the guest instead of a shell and three (each costs a lot under TCG)."""
        state = self._state
        assert state.sockdir is not None and state.machine is not None
        scale = state.timeout_scale
        hostname = self._hostname() + "\n"
        with state.machine.agent() as agent:
            agent.connect(10 * scale)
            started = agent.execute(
                "guest-exec", path="/bin/date", arg=["-u", "-s", f"@{time.time():.6f}"]
            )
            agent.write_file("/proc/sys/kernel/hostname", hostname)
            agent.write_file("/etc/hostname", hostname)
            with contextlib.suppress(GuestAgentError):  # an image without cloud-init
                agent.write_file(
                    "/etc/cloud/cloud.cfg.d/99-pytest-kvm-clone.cfg", "preserve_hostname: true\n"
                )
            agent_wait(agent, started["pid"], "date", 20 * scale)
            if self._nics.vlan_ports:  # while SSH still shakes hands
                started = agent.execute(
                    "guest-exec", path="/bin/sh", arg=["-c", self._nics.vlan_script()],
                    **{"capture-output": True},
                )  # fmt: skip
                agent_wait(agent, started["pid"], "the vlan set-up", 60 * scale)
                self._nics.vlans_done = True


def copy_ram(source: Path, target: Path) -> Path:
    """A copy of a template's RAM file, its holes kept (pages never touched)."""
    try:
        subprocess.run(
            ["cp", "--sparse=always", "--", str(source), str(target)],
            check=True, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
    except subprocess.CalledProcessError as exc:
        raise GuestError(f"copying {source} to {target}: {exc.stderr.strip()}") from None
    return target


def _wait_connections_closed(machine: Machine, timeout: float) -> None:
    """Until QEMU's user network has no TCP connection left (only its forwards), so
    that no clone starts with the template's SSH connection half-open."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        table = machine.qmp("human-monitor-command", **{"command-line": "info usernet"})
        if not any(
            line.strip().startswith("TCP[") and "HOST_FORWARD" not in line
            for line in str(table).splitlines()
        ):
            return
        time.sleep(0.05)


def save_state(state: GuestState, user_network: bool, connection: Connection, path: Path) -> None:
    """See ``Guest.save_state``."""
    machine = state.machine
    saver = machine.state_saver() if machine is not None else None
    if machine is None or saver is None:
        raise GuestError(f"{state.what}: its backend cannot save a template", state.name)
    connection.drop()
    scale = state.timeout_scale
    if user_network:
        _wait_connections_closed(machine, 10 * scale)
    saver.save_state(path, timeout=120 * scale)
    if machine.is_running():  # libvirt's save stops the domain itself
        machine.qmp("quit")
    if not machine.wait_for_exit(30 * scale):
        raise GuestError(f"{state.what}: QEMU did not quit after saving", state.name)
