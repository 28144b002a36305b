"""The Guest facade: what a test holds. Like the NixOS test driver's Machine, with quoting.

It records its parts in the constructor and starts them in ``start()``; the parts
(commands, boot, clone, NICs, screen, disk) get what they need passed in and never
call back into it. Its cleanup is one ExitStack, in a fixed order.

Just over 600 lines: most of it is the user documentation of the delegating methods
(the docstrings ``help(guest)`` shows), kept here where users read it."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import paramiko

from .. import arch as arches
from ..accel import AccelChoice
from ..backends import load_backend
from ..backends.base import Machine
from ..console import Console, tail
from ..customize import GuestDisk
from ..errors import GuestError, GuestTimeout, KvmConfigError
from ..run import RunContext
from ..ssh import CommandTimeout, KeyPair, SshSession
from ..vlan import Vlan
from .agent import agent_answers, sync_by_agent
from .boot import RealBoot
from .clone import Restore, save_state
from .commands import CommandResult, Commands
from .config import BootPlan, GuestConfig, SavedGuest, check_config, check_template
from .connection import Connection
from .disk import Disk
from .launch import Launcher
from .nics import Nics
from .nixos import NixosNames
from .screen import Screen
from .shares import mount_shares
from .state import GuestState


def timeout_scale(run: RunContext, arch: str) -> float:
    """How much longer than on KVM boot and command waits are: the accelerator's scale
    (TCG: x3), and for a guest of another architecture than the host's, which always
    runs under TCG, that times the architecture's own slowdown (arch.py)."""
    spec = arches.get(arch)
    if spec.is_host():
        return run.accel.timeout_scale
    return AccelChoice("tcg", "").timeout_scale * spec.foreign_slowdown


class Guest(NixosNames):
    """A disposable virtual machine. The constructor records; ``start()`` acts.
    (The NixOS driver's names for its methods are in nixos.py.)"""

    def __init__(
        self,
        run: RunContext,
        config: GuestConfig,
        name: str | None = None,
        *,
        template: SavedGuest | None = None,
        plan: BootPlan | None = None,
    ) -> None:
        check_config(config)
        if template is not None:
            check_template(config, template)
        self._run = run
        self.config = config
        self.template = template
        self._plan = plan
        self._client_key = (
            plan.client_key if plan else (template.client_key if template else run.client_key)
        )
        self.name = run.identity.next_name(name)
        self.image = config.image
        self.backend = config.backend
        if config.runner is None and config.backend != "qemu":
            raise KvmConfigError(f"the {config.backend} backend needs its target (URI and pool)")
        self._runner = config.runner or load_backend("qemu")
        # A remote hypervisor: its guests' forwards are on its host's 127.0.0.1, reached
        # through that host's SSH.
        self._jump = self._runner.jump()
        scale = timeout_scale(run, config.arch)
        self.boot_timeout = config.boot_timeout * scale
        self.timeout_scale = scale
        self._state = GuestState(
            name=self.name,
            what=self.describe(),
            timeout_scale=scale,
            # A clone too has its own (see identity.py); a bridge guest's is reserved.
            mac=run.identity.mac_for(self.name),
            address="127.0.0.1" if config.network.kind == "user" else "",
        )
        self._connection = Connection(
            self._state, config.user, self._client_key, self._jump, self.boot_timeout, run.progress
        )
        self._commands = Commands(
            self._connection, self._state.alive, self._state.crash_lines,
            what=self._state.what, name=self.name, timeout_scale=scale,
            boot_timeout=config.boot_timeout,
        )  # fmt: skip
        self._nics = Nics(
            self._state, config.network, config.vlans,
            libvirt=config.backend == "libvirt", remote=self._jump is not None,
            template_vlan_macs=template.vlan_macs if template is not None else None,
        )  # fmt: skip
        self._screen = Screen(self._state, display=config.display, vnc=config.vnc,
                              progress=run.progress, text_mode=config.arch == "x86_64")  # fmt: skip
        self._disk = Disk(self._state, config.image, blank=config.blank,
                          force_tcg=run.accel.name != "kvm")  # fmt: skip
        self._cleanup = ExitStack()  # what close() undoes; see _push_cleanup
        self._push_cleanup()
        self._closed = False
        self.kept = False
        # Starts another guest like this one's factory: set by kvm_guest_factory, so
        # that boot_installed() can boot this guest's disk.
        self.boot_disk: Callable[..., Guest] | None = None

    # -- what the parts hold, as attributes ------------------------------------------

    @property
    def mac(self) -> str:
        return self._state.mac

    @property
    def firmware(self) -> str:
        """What the guest booted with: "bios", "uefi", "uefi-secure" or "u-boot"."""
        return self.config.firmware

    @property
    def arch(self) -> str:
        """The guest's architecture as ``uname -m`` names it: "x86_64", "aarch64",
        "riscv64" (the image's own; ``--kvm-arch``/``arch=`` can only confirm it)."""
        return self.config.arch

    @property
    def address(self) -> str:
        return self._state.address

    @property
    def workdir(self) -> Path | None:
        return self._state.workdir

    @property
    def machine(self) -> Machine | None:
        return self._state.machine

    @machine.setter
    def machine(self, machine: Machine | None) -> None:
        self._state.machine = machine

    @property
    def console(self) -> Console:
        if self._state.console is None:
            raise AttributeError("console: the guest has not started")
        return self._state.console

    @console.setter
    def console(self, console: Console) -> None:
        self._state.console = console

    @property
    def _ssh(self) -> SshSession | None:
        return self._connection.session

    @_ssh.setter
    def _ssh(self, session: SshSession | None) -> None:
        self._connection.session = session

    @property
    def boot_timings(self) -> dict[str, float]:
        return self._state.boot_timings

    @property
    def vnc(self) -> tuple[str, int] | None:
        """(host, port) of the VNC display (--kvm-vnc), once running."""
        return self._screen.vnc

    # -- lifecycle -------------------------------------------------------------------

    def describe(self) -> str:
        if self.config.blank:
            media = self.config.cdrom or self.config.kernel
            return f"guest {self.name!r} (installing from {Path(str(media)).name})"
        return f"guest {self.name!r} ({self.image.name})"

    def start(self) -> Guest:
        if self.workdir is not None:
            raise GuestError(f"{self.describe()}: already started", self.name)
        state = self._state
        t0 = time.monotonic()
        try:
            state.workdir = self._run.guest_dir(self.name)
            state.sockdir = self._run.socket_dir(self.name)
            # Before anything starts: what a killed run leaves, `reap` finds here.
            state.lease = self._run.guest_lease(
                self.name,
                workdir=str(state.workdir),
                sockdir=str(state.sockdir),
                backend=self.backend,
                uri=self._runner.uri,
            )
            state.console = Console(
                state.workdir / "serial.log",
                state.sockdir / "console.sock",
                self.describe(),
                alive=state.alive,
                guest=self.name,
            )
            self._nics.prepare(self._run)
            launcher = Launcher(
                self._run, self.config, self._runner, state, self._nics, self._screen
            )
            parts = (self._disk, self._nics, launcher, self._connection, self._commands)
            if self.template is not None:
                Restore(self.config, state, self.template, parts, self._plan).start()
            else:
                RealBoot(self.config, state, self._plan, self._client_key, parts).start()
            if self._nics.vlan_ports and self.config.ssh and not self._nics.vlans_done:
                t1 = time.monotonic()
                self._nics.configure_vlans(self._commands.run)
                state.boot_timings["vlan"] = time.monotonic() - t1
            if self.config.shares and self.config.ssh:
                t1 = time.monotonic()
                mount_shares(self._commands, self.config.shares, self.template is not None,
                             state.what, self.name)  # fmt: skip
                state.boot_timings["shares"] = time.monotonic() - t1
            state.boot_timings["total"] = time.monotonic() - t0
            return self
        except BaseException:
            self.close()
            raise

    def _push_cleanup(self) -> None:
        """What close() undoes, pushed so that it runs in this order: this side of the
        guest (disk reader, SSH, console), the machine, the network, the directories,
        and last the lease (a reaper's note that something may be left)."""
        state, stack = self._state, self._cleanup

        def remove_lease() -> None:
            if state.lease is not None:
                state.lease.remove()

        def remove_dirs() -> None:
            for path in (state.workdir, state.sockdir):
                if path is not None:
                    shutil.rmtree(path, ignore_errors=True)

        def close_machine() -> None:
            if state.machine is not None:
                state.machine.close()

        def close_tpm() -> None:  # after QEMU, which talks to it until it ends
            if state.tpm is not None:
                state.tpm.close()

        stack.callback(remove_lease)
        stack.callback(remove_dirs)
        stack.callback(self._nics.close)
        stack.callback(close_tpm)
        stack.callback(close_machine)
        stack.callback(self._close_this_side)

    def _close_this_side(self) -> None:
        """The disk reader, SSH and the console: what a kept guest closes too."""
        try:
            self._disk.close_reader()
        finally:
            self._connection.close()
            if self._state.console is not None:
                self._state.console.close()

    def close(self) -> None:
        """Stop the guest and remove everything it had; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._disk.closed = True
        self._cleanup.close()

    def __enter__(self) -> Guest:
        return self.start() if self.workdir is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def keep(self) -> str:
        """Leave the guest running after the test and the run (--kvm-keep-on-failure):
        close only this side of it. Returns how to reach it and how to remove it."""
        machine = self.machine
        if self.kept:
            return f"{self.describe()}: kept already"
        if machine is None or not machine.is_running():
            return f"{self.describe()}: not kept: it is not running"
        keeper = machine.keeper()
        if keeper is None:
            return f"{self.describe()}: not kept: {machine.keep_refusal}"
        if not self.config.keepable:
            return f"{self.describe()}: not kept: it was started to die with this process"
        self.kept = True
        self._closed = True  # close() leaves it alone from now on
        self._disk.closed = True
        self._cleanup.pop_all()
        self._state.record(kept=True)
        self._run.keep(self.name)
        with contextlib.suppress(Exception):
            self._disk.close_reader()
        self._connection.close()
        if self._state.console is not None:
            self._state.console.close()
        keeper.detach()
        lines = [f"kept {self.describe()} running: QEMU pid {keeper.pid}"]
        if self.config.ssh:
            lines.append(f"  ssh:        {self.ssh_command}")
        console = shlex.quote(str(machine.spec.console_socket))
        lines += [
            f"  console:    socat -,raw,echo=0 UNIX-CONNECT:{console}",
            f"  serial log: {self.serial_log}",
            "  remove it:  pytest-kvm reap   (ends the kept guests of every finished run)",
        ]
        return "\n".join(lines)

    # -- templates ---------------------------------------------------------------------

    def agent_answers(self, timeout: float = 5.0) -> bool:
        """Whether qemu-ga answers on the guest's agent channel."""
        assert self._state.sockdir is not None and self.machine is not None
        return agent_answers(self.machine, timeout * self.timeout_scale)

    @property
    def host_key(self) -> KeyPair | None:
        """The SSH host key this guest is pinned to (what a template saves)."""
        return self._connection.host_key

    def save_state(self, path: Path) -> None:
        """Close SSH, pause the guest, write its device state to ``path``, stop QEMU.

        RAM is not in the file: it stays in the guest's shared RAM file."""
        save_state(self._state, self._nics.user, self._connection, path)

    # -- the disk ----------------------------------------------------------------------

    @property
    def disk(self) -> GuestDisk:
        """The stopped guest's disk, read-only through libguestfs: ``read_text(path)``,
        ``ls(path)``, ``exists(path)``, ``journal()``. Stop the guest first
        (``shutdown()`` or ``kill()``); it is readable until the guest is closed."""
        return self._disk.reader

    @property
    def disk_image(self) -> Path:
        """This guest's own disk (a qcow2 in its directory; an installer's installed
        disk): what ``kvm_guest_factory(disk=...)`` boots. It goes with the guest."""
        return self._disk.image

    def boot_installed(self, **factory_args: Any) -> Guest:
        """Boot what an installer wrote: a new SSH-ready guest on an overlay of this
        guest's disk (this disk is not changed). Arguments go to kvm_guest_factory."""
        self._disk.stopped("boot_installed()")
        if self.boot_disk is None:
            raise GuestError(
                f"{self.describe()}: boot_installed() needs a guest made by "
                "kvm_guest_factory; boot the disk with kvm_guest_factory(disk=...)",
                self.name,
            )
        return self.boot_disk(disk=self.disk_image, **factory_args)

    def save_image(self, path: str | os.PathLike[str]) -> Path:
        """Keep this guest's disk as a standalone qcow2 image at ``path`` (whole or not
        at all), for later tests: ``--kvm-image PATH`` or ``factory(image=PATH)``."""
        return self._disk.save_image(path)

    def answers_ssh(self, timeout: float = 10) -> bool:
        """Whether the guest runs ``true`` over its open SSH connection within
        ``timeout`` seconds (not scaled, no reconnecting): a quick look before work
        that would otherwise wait out long timeouts on a guest whose network is gone."""
        ssh = self._connection.session
        if not self.is_running or ssh is None or not ssh.is_active():
            return False
        try:
            return ssh.exec("true", timeout, alive=self._state.alive).exit_status == 0
        except (CommandTimeout, OSError, EOFError, paramiko.SSHException):
            return False

    def run_if_answering(self, cmd: str, timeout: float = 10) -> CommandResult | None:
        """``cmd`` over the open SSH connection, like ``answers_ssh`` (unscaled, no
        reconnecting); None when the guest is down or does not answer in time."""
        ssh = self._connection.session
        if not self.is_running or ssh is None or not ssh.is_active():
            return None
        try:
            raw = ssh.exec(cmd, timeout, alive=self._state.alive)
        except (CommandTimeout, OSError, EOFError, paramiko.SSHException):
            return None
        return CommandResult(cmd, raw.exit_status, raw.stdout, raw.stderr)

    def journal_text(self, timeout: float = 60, ssh: bool = True) -> tuple[str, str]:
        """The journal of the guest's current boot and where it came from: over SSH
        while it answers; else the guest is stopped (after a sync through the guest
        agent where that answers) and its journal is read from its disk.
        ``ssh=False`` goes to the disk at once (for a caller that knows SSH is gone)."""
        session = self._connection.session if ssh else None
        if self.is_running and session is not None and session.is_active():
            # Straight on the session: no reconnecting, no waiting scaled for TCG.
            with contextlib.suppress(CommandTimeout, OSError, EOFError, paramiko.SSHException):
                raw = session.exec(
                    "journalctl -b --no-pager -o short", timeout, alive=self._state.alive
                )
                if raw.exit_status == 0:
                    return raw.stdout, "journalctl over SSH"
        synced = ""
        if self.is_running:
            # A panicked guest answers neither SSH nor its agent: do not wait for them.
            dead = self._state.alive()
            if dead:
                synced = f" ({dead}: the last entries may be missing)"
            elif self._state.sockdir is not None:
                assert self.machine is not None
                synced = sync_by_agent(self.machine, timeout, self.timeout_scale)
            self.kill()
        return self.disk.journal(), f"the disk, read with libguestfs{synced}"

    # -- network ------------------------------------------------------------------------

    @property
    def host_address(self) -> str | None:
        """The address at which the guest reaches the host (user networking only):
        a connection to ``host_address:PORT`` arrives at 127.0.0.1:PORT on the host."""
        return self._nics.host_address

    @property
    def vlan_macs(self) -> tuple[str, ...]:
        """The MACs of the guest's vlan NICs, in order."""
        return tuple(nic.mac for nic in self._nics.nics)

    @property
    def forwarded_ports(self) -> dict[int, int]:
        """guest port -> host port on 127.0.0.1, SSH's included."""
        return self._nics.forwarded_ports

    def forward_port(self, guest_port: int, host_port: int | None = None) -> int:
        """Forward TCP ``127.0.0.1:host_port`` on the host to ``guest_port`` in the
        guest (user networking); returns the host port, chosen free if not given."""
        __tracebackhide__ = True
        return self._nics.forward_port(guest_port, host_port)

    def set_link(self, up: bool, vlan: Vlan | None = None) -> None:
        """Plug (``up=True``) or pull the virtual cable of a NIC: the one on ``vlan``;
        by default the guest's only vlan NIC, or its primary NIC if it has none (on
        user and bridge networks that also cuts the test's SSH)."""
        self._nics.set_link(up, vlan)

    # -- facts --------------------------------------------------------------------------

    @property
    def serial_log(self) -> Path:
        return self.console.log_path

    @property
    def ssh(self) -> paramiko.SSHClient:
        return self._connection.current().client

    @property
    def ssh_port(self) -> int:
        return self._state.port

    @property
    def known_hosts(self) -> Path:
        session = self._connection.session
        assert self.workdir is not None and session is not None
        path = self.workdir / "known_hosts"
        if not path.exists():
            path.write_text(session.known_hosts_line())
            path.chmod(0o600)
        return path

    @property
    def ssh_command(self) -> str:
        """A command line a person can paste into a shell to reach this guest."""
        argv = [
            "ssh", "-i", str(self._client_key.path), "-p", str(self.ssh_port),
            "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={self.known_hosts}",
            *(["-J", self._jump.spec] if self._jump else []),
            f"{self.config.user}@{self.address}",
        ]  # fmt: skip
        return shlex.join(argv)

    @property
    def os_release(self) -> dict[str, str]:
        """The guest's ``/etc/os-release``, parsed (no shell): ``{"ID": "debian",
        "VERSION_ID": "12", ...}``. Read once per guest; a copy each time."""
        cached: dict[str, str] | None = self.__dict__.get("_os_release")
        if cached is None:
            from ..osrelease import parse_os_release

            text = self.succeed("cat /etc/os-release 2>/dev/null || cat /usr/lib/os-release")
            cached = self.__dict__["_os_release"] = parse_os_release(text)
        return dict(cached)

    @property
    def host(self) -> Any:
        """A testinfra ``Host`` whose commands go over this guest's SSH connection
        (``guest.ssh``: the run's key, the pinned host key). Needs pytest-testinfra;
        without it raises ``MissingTestinfra`` (a KvmUnavailable and an ImportError)."""
        host = self.__dict__.get("_testinfra_host")
        if host is None:
            from ..testinfra_backend import make_host

            target = f"{self.config.user}@{self.address}:{self.ssh_port}"
            host = self.__dict__["_testinfra_host"] = make_host(
                self.describe(), target, self._commands
            )
        return host

    # -- commands (see commands.py) -----------------------------------------------------

    def run(self, cmd: str, timeout: float = 60) -> CommandResult:
        """Run ``cmd`` with the guest's shell; never raises for a non-zero exit."""
        __tracebackhide__ = True
        return self._commands.run(cmd, timeout)

    def reconnect(self) -> None:
        """Close the SSH connection and open a new one."""
        self._connection.reconnect(60 * self.timeout_scale)

    def succeed(self, cmd: str, timeout: float = 60) -> str:
        """Run ``cmd``; return its stdout, or raise CommandFailed with both output tails."""
        __tracebackhide__ = True
        return self._commands.succeed(cmd, timeout)

    def fail(self, cmd: str, timeout: float = 60) -> str:
        """Run ``cmd``; it must fail. Returns its stderr (or stdout if stderr is empty)."""
        __tracebackhide__ = True
        return self._commands.fail(cmd, timeout)

    def wait_until_succeeds(self, cmd: str, timeout: float = 120) -> str:
        """Retry ``cmd`` until it exits 0; the timeout error shows the last attempt."""
        __tracebackhide__ = True
        return self._commands.wait_until_succeeds(cmd, timeout)

    @property
    def init_system(self) -> str:
        """``"systemd"`` if systemd runs the guest (``/run/systemd/system`` exists),
        else the name of PID 1 (``"init"`` for sysvinit). Asked once per guest."""
        return self._commands.init_system

    def wait_for_unit(self, unit: str, timeout: float = 120) -> None:
        """Wait until a systemd unit is active; a failed unit raises at once.

        On a guest without systemd (sysvinit) it raises GuestError at once: there
        are no units to ask about, and guessing from init scripts could be wrong."""
        __tracebackhide__ = True
        self._commands.wait_for_unit(unit, timeout)

    def wait_for_port(self, port: int, timeout: float = 120) -> None:
        """Wait until something in the guest listens on TCP ``port``."""
        __tracebackhide__ = True
        self._commands.wait_for_port(port, timeout)

    def wait_for_console(self, regex: str | re.Pattern[str], timeout: float = 120) -> re.Match[str]:
        __tracebackhide__ = True
        return self.console.expect(regex, timeout * self.timeout_scale)

    def put(self, local: str | Path, remote: str, timeout: float = 300) -> None:
        """Copy the host file ``local`` to ``remote`` in the guest by SFTP, within
        ``timeout`` s (scaled under TCG); a guest that dies meanwhile is
        ``GuestCrashed`` within about a second."""
        self._commands.put(local, remote, timeout)

    def get(self, remote: str, local: str | Path, timeout: float = 300) -> Path:
        """Copy ``remote`` in the guest to the host file ``local`` by SFTP, like ``put``."""
        return self._commands.get(remote, local, timeout)

    # -- power -------------------------------------------------------------------------

    def reboot(self, timeout: float | None = None) -> None:
        """Reboot the guest and wait until it answers SSH again (a new boot); its
        shared folders are mounted again."""
        __tracebackhide__ = True
        self._commands.reboot(timeout, self.console.skip_to_end)
        if self.config.shares:  # the new boot found the devices on its own
            mount_shares(self._commands, self.config.shares, False, self._state.what, self.name)

    def shutdown(self, timeout: float = 120) -> None:
        """Power off cleanly (ACPI) and wait until QEMU exits."""
        if self.machine is None:
            return
        self._connection.close()
        self.machine.shutdown(timeout * self.timeout_scale)

    def wait_for_shutdown(self, timeout: float = 300) -> None:
        __tracebackhide__ = True
        assert self.machine is not None
        if not self.machine.wait_for_exit(timeout * self.timeout_scale):
            screen = self._screen.quiet_text()
            shown = f"; the screen shows:\n{screen}\n---" if screen else ""
            raise GuestTimeout(
                f"{self.describe()}: did not power off within "
                f"{timeout * self.timeout_scale:.0f} s{shown}; "
                f"last console lines:\n{tail(self.console.log_path, 20)}",
                self.name,
            )

    def kill(self) -> None:
        """Pull the plug."""
        self._connection.close()
        if self.machine is not None:
            self.machine.kill()

    @property
    def is_running(self) -> bool:
        return self.machine is not None and self.machine.is_running()

    def resource_usage(self) -> str:
        """What the guest consumed so far, from libvirt's domain statistics: CPU time,
        peak resident memory, bytes written to its disks ("" on the qemu backend)."""
        if self.machine is None:
            return ""
        stats = self.machine.stats()
        if not stats:
            return ""
        return (
            f"cpu {stats['cpu_time_ns'] / 1e9:.1f} s, "
            f"peak memory {stats['peak_rss_kib'] / 1024:.0f} MiB, "
            f"disk written {stats['disk_written_bytes'] / 2**20:.1f} MiB"
        )

    def qmp(self, command: str, **args: Any) -> Any:
        assert self.machine is not None
        return self.machine.qmp(command, **args)

    # -- display and keyboard (see screen.py) -----------------------------------------

    @property
    def vnc_password_file(self) -> Path | None:
        """The private file holding this guest's VNC password (--kvm-vnc), else None."""
        return self._screen.password_file

    @property
    def has_display(self) -> bool:
        """It has a graphics card: installers, display=True, --kvm-vnc."""
        return self._screen.has_display

    def screenshot(self, path: str | os.PathLike[str] | None = None) -> Path:
        """A PNG of the guest's display, written to ``path`` (default: in the guest's
        directory, numbered) and returned."""
        return self._screen.screenshot(path)

    def send_keys(self, *keys: str, delay: float = 0.05) -> None:
        """Press keys on the guest's keyboard, one chord per argument:
        ``send_keys("down", "down", "ret")``, ``send_keys("ctrl-alt-delete")``."""
        self._screen.send_keys(*keys, delay=delay)

    def type_text(self, text: str, delay: float = 0.02) -> None:
        """Type ``text`` on the guest's keyboard (US layout; newline is Enter)."""
        self._screen.type_text(text, delay)

    def screen_text(self) -> str:
        """The text on the screen: in VGA text mode (BIOS, boot loader, a console
        without a framebuffer driver) read through the monitor (briefly borrows the
        VGA index register); in a graphics mode (a framebuffer console, an installer, a
        desktop) read by OCR of a screenshot with tesseract (Debian's tesseract-ocr;
        without it a ``KvmUnavailable`` naming the package). "" without a display."""
        return self._screen.screen_text()

    def wait_for_text(self, regex: str | re.Pattern[str], timeout: float = 120) -> re.Match[str]:
        """Poll ``screen_text()`` until ``regex`` matches (``re.search``) within
        ``timeout`` s (scaled under TCG); returns the match, else ``GuestTimeout`` with
        the last text seen. The NixOS driver's ``wait_for_text``; needs a display."""
        __tracebackhide__ = True
        return self._screen.wait_for_text(regex, timeout * self.timeout_scale)

    def __repr__(self) -> str:
        return f"<Guest {self.name} {self.image.name} port={self.ssh_port}>"
