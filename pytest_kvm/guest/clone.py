"""A guest restored from a template: a fresh overlay over the template's disk, its
saved state (with the clone's own MAC), then made its own machine (MAC, machine-id,
DHCP identity, host key, time, host name, vlan NICs) through qemu-ga or SSH.
Also the other side: saving a booted guest's state as a template."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import threading
import time
from pathlib import Path

from ..backends.base import Drive, Machine
from ..errors import GuestError
from ..firmware import VARS_NAME
from ..images.overlay import create_overlay
from ..qga import AgentCalls
from ..util import Background, tail_text
from .agent import agent_any_exists, agent_wait, agent_wait_for_files
from .commands import Commands
from .config import BootPlan, GuestConfig, SavedGuest
from .connection import Connection
from .disk import Disk
from .identity import HOST_KEY, RELOAD_HOST_KEYS, SSHD_SESSION, CloneIdentity, write_clone_state
from .launch import Launcher
from .nics import Nics
from .state import GuestState


class Restore:
    """Restore ``template``'s saved state over a fresh overlay, then make it this guest:
    a machine of its own (``identity.py``), reached at its own MAC and host key."""

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
        # qemu-ga tried to write the host key (and on user networking the NIC's MAC)
        self._key_set = threading.Event()
        self._key_in_guest = False  # ... and did
        # The journal files the restarted journald may make (identity.JOURNAL_READY:
        # one per journal directory that had one; it writes to one of them), and
        # whether one came: until then a journalctl in the guest misses what is logged.
        self._journal_files: list[str] = []
        self._journal_up = True

    def start(self) -> None:
        state, template, timings = self._state, self._template, self._state.boot_timings
        assert state.workdir is not None
        scale = state.timeout_scale
        t0 = time.monotonic()
        where = self._plan.dir if self._plan else state.workdir
        overlay = create_overlay(template.disk.absolute(), "qcow2", where / "disk.qcow2")
        self._disk.overlay = overlay
        runner = self._config.runner
        if runner is not None and not runner.clone_mac:
            state.mac = template.mac  # see Backend.clone_mac
        identity = CloneIdentity.new(
            template.mac, state.mac, self._hostname(), bridge=not self._nics.user
        )
        incoming = template.state
        if state.mac != template.mac and (runner is None or runner.ram_in_file):
            # Its own copy of the device state, its own MAC where the template's was.
            # On user networking, slirp's DHCP table only: the NIC keeps the template's
            # MAC (what the guest kernel still uses) until the guest changes it, and
            # SSH need not wait for that: the script's first lines change it, with
            # arp_notify, so slirp learns the new MAC the moment the NIC takes it.
            # Without qemu-ga the same script runs over that first SSH session.
            incoming = write_clone_state(
                template.state, state.workdir / "state", template.mac, state.mac, state.what,
                only=b"slirp" if self._nics.user else None,
            )  # fmt: skip
        # (A backend whose saved state holds the RAM, libvirt's, gives the clone its
        # MAC in the copy of the state it makes anyway: see its machine's restore.)
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
        # UEFI: a copy of the template's variables of its own (QEMU writes the flash
        # contents of the migration stream back into it; the template's stays as is).
        self._launcher.launch(drives, ram_file=ram, ram_shared=shared, incoming=incoming,
                              efivars=where / VARS_NAME,
                              efivars_from=template.disk.parent / VARS_NAME)  # fmt: skip
        timings["restore"] = time.monotonic() - t1
        t2 = time.monotonic()
        # The guest agent makes it this guest while SSH shakes hands.
        adopt = None
        if template.agent:
            adopt = Background(lambda: self._adopt_by_agent(identity), "adopt-by-agent")
        if not self._nics.user:
            # A bridge guest: its own address once it took its own MAC and DHCP lease.
            assert adopt is not None  # config.template_refusal
            self._join(adopt, 90 * scale)
            t3 = time.monotonic()
            deadline = time.monotonic() + self._config.boot_timeout * scale
            state.address = self._nics.learn_address(deadline, self._config.boot_timeout * scale)
            timings["address"] = time.monotonic() - t3
        else:
            self._key_set.wait(30 * scale if adopt is not None else 0)
        # Pinned: the clone's own key once qemu-ga wrote it, else the template's.
        self._connection.host_key = identity.host_key if self._key_in_guest else template.host_key
        self._connection.connect(time.monotonic() + 60 * scale, waited=60 * scale)
        timings["ssh_ready"] = time.monotonic() - t2
        t3 = time.monotonic()
        if adopt is None or adopt.join(90 * scale) is not None:  # over SSH
            script = identity.script(time.time(), host_private_key=True)
            result = self._commands.run(script, timeout=60)
            if result.exit_status != 0:
                raise GuestError(
                    f"{state.what}: could not make the restored clone its own machine "
                    f"(exit {result.exit_status}): {tail_text(result.stderr or result.stdout)}",
                    state.name,
                )
            self._journal_files = identity.journal_files(result.stdout)
            if self._journal_files:
                waited = self._commands.run(wait_for_files_script(self._journal_files,
                                                                  JOURNAL_WAIT * scale),
                                            timeout=JOURNAL_WAIT * scale + 30)  # fmt: skip
                self._journal_up = waited.exit_status == 0
        if not self._journal_up:
            raise GuestError(
                f"{state.what}: journald did not come back within "
                f"{JOURNAL_WAIT * scale:.0f} s of the restart that gave it the clone's "
                f"machine-id (none of {', '.join(self._journal_files)})",
                state.name,
            )
        # From here on, SSH (a reconnect, a reboot, ssh_command's known_hosts) meets
        # the clone's own host key; the open session was checked already.
        self._connection.host_key = identity.host_key
        self._connection.current().host_key = identity.host_key
        timings["adopt"] = time.monotonic() - t3

    def _join(self, adopt: Background, timeout: float) -> None:
        error = adopt.join(timeout)
        if error is not None:
            raise GuestError(
                f"{self._state.what}: the guest agent could not make the restored clone its "
                f"own machine: {error}",
                self._state.name,
            ) from error

    def _hostname(self) -> str:
        return self._config.hostname or self._state.name[:63]

    def _adopt_by_agent(self, identity: CloneIdentity) -> None:
        """The clone's host key first (before SSH connects, which waits for it), then
        ``identity.script`` and the vlan NICs' in one shell: each process started in
        the guest costs a lot under TCG."""
        state = self._state
        assert state.sockdir is not None and state.machine is not None
        scale = state.timeout_scale
        try:
            with state.machine.agent() as agent:
                agent.connect(10 * scale)
                try:
                    # Both halves before SSH connects: sshd reads both, and a public
                    # key that does not match the private one is an error in the
                    # clone's journal.
                    agent.write_file(f"{HOST_KEY}.pub", identity.host_key.public_openssh + "\n")
                    agent.write_file(HOST_KEY, identity.host_key.private_openssh)
                    holds = self._template.sshd_holds_keys
                    if holds is None:  # not recorded: ask (see identity.SSHD_SESSION)
                        holds = _holds_host_keys(agent)
                    if holds:
                        started = agent.execute(
                            "guest-exec", path="/bin/sh", arg=["-c", RELOAD_HOST_KEYS],
                            **{"capture-output": True},
                        )  # fmt: skip
                        agent_wait(agent, started["pid"], "restarting sshd", 60 * scale)
                    self._key_in_guest = True
                finally:
                    self._key_set.set()
                vlans = self._nics.vlan_script() if self._nics.vlan_ports else ""
                script = identity.script(time.time(), host_private_key=False, more=vlans)
                started = agent.execute(
                    "guest-exec", path="/bin/sh", arg=["-c", script], **{"capture-output": True}
                )
                out = agent_wait(
                    agent, started["pid"], "making the clone its own machine", 90 * scale
                )
                self._nics.vlans_done = bool(vlans)
                self._journal_files = identity.journal_files(out)
                if self._journal_files:
                    self._journal_up = agent_wait_for_files(
                        agent, self._journal_files, JOURNAL_WAIT * scale
                    )
        finally:
            self._key_set.set()


#: How long (scaled) a clone's start waits for the journald it restarted.
JOURNAL_WAIT = 30.0


def wait_for_files_script(paths: list[str], timeout: float) -> str:
    """A shell loop (over SSH, without qemu-ga) until one of ``paths`` exists; exit 1
    after about ``timeout`` s."""
    rounds = max(1, int(timeout / 0.05))
    quoted = " ".join(shlex.quote(path) for path in paths)
    return (
        f'n=0; while :; do for f in {quoted}; do [ ! -e "$f" ] || exit 0; done; '
        f'n=$((n + 1)); [ "$n" -le {rounds} ] || exit 1; sleep 0.05; done\n'
    )


def _holds_host_keys(agent: AgentCalls) -> bool:
    """Whether the guest's sshd reads its host keys once (OpenSSH 9.8 and later: it
    has an ``sshd-session`` binary), asked without starting a guest process."""
    return agent_any_exists(agent, SSHD_SESSION)


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
