"""The Guest facade: what a test holds. Like the NixOS test driver's Machine, with quoting."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import os
import re
import shlex
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paramiko

from .artifacts import WAIT_PROGRESS_EVERY, waiting_line
from .backends import load_backend
from .backends.base import Backend, Drive, Labels, Machine, MachineSpec, Nic, QmpError
from .config import DEFAULT_BRIDGE_HELPER, NetworkSpec
from .console import Console, tail
from .customize import (
    Access,
    DiskHandle,
    DiskSource,
    GuestDisk,
    check_hostname,
    inject_access,
)
from .display import (
    PNG_MAGIC,
    VGA_TEXT_ADDRESS,
    VGA_TEXT_BYTES,
    key_chord,
    ppm_to_png,
    qmp_keys,
    text_chords,
    vga_text,
    vnc_password,
)
from .errors import (
    CommandFailed,
    GuestCrashed,
    GuestError,
    GuestLaunchError,
    GuestTimeout,
    KvmConfigError,
)
from .images import Image
from .images.kernel import BootFiles
from .images.overlay import create_blank_disk, create_overlay, flatten_image
from .media import check_install_media
from .network import (
    USER_NET_HOST,
    MacReservation,
    Tap,
    bridge_fdb_macs,
    bridge_problem,
    check_port_number,
    free_port,
    has_net_admin,
    helper_problem,
    ipv4_from_agent,
    ipv4_from_console,
    no_tap_message,
    port_in_use,
)
from .qga import AgentCalls, GuestAgentError
from .reaper import Lease, process_start
from .run import RunContext
from .seed import SeedConfig, write_seed
from .ssh import CommandTimeout, GuestDied, JumpFailed, KeyPair, SshSession, TransferTimeout
from .vlan import Vlan, VlanPort

if TYPE_CHECKING:
    from .template import Template

_PANIC = re.compile(r"Kernel panic - not syncing[^\n]*")
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)
# An installer's empty disk: unless disk_size= says otherwise; never smaller than this.
DEFAULT_BLANK_DISK = 8 << 30
MIN_BLANK_DISK = 16 << 20


@dataclass(frozen=True)
class CommandResult:
    """What a command did, like testinfra's CommandResult."""

    command: str
    exit_status: int
    stdout: str
    stderr: str

    @property
    def succeeded(self) -> bool:
        return self.exit_status == 0

    @property
    def failed(self) -> bool:
        return self.exit_status != 0


@dataclass(frozen=True)
class GuestConfig:
    """How one guest is made; resolved from settings, marker and factory arguments."""

    image: Image
    memory: int = 1024
    cpus: int = 2
    network: NetworkSpec = field(default_factory=lambda: NetworkSpec("user"))
    boot_timeout: float = 300.0
    hostname: str | None = None
    cdrom: Path | None = None
    disk_size: int | str | None = None
    boot: str = "disk"
    ssh: bool = True
    user: str = "root"
    # Extra kernel arguments: a direct kernel boot with ``boot_files`` (read from
    # the image), their command line plus these.
    kernel_args: str = ""
    boot_files: BootFiles | None = None
    # Installers: an empty disk of ``disk_size`` instead of an overlay of the image
    # (boot="cdrom", or a network-boot style kernel/initrd/append).
    blank: bool = False
    kernel: Path | None = None
    initrd: Path | None = None
    append: str = ""
    # A graphics card (screenshots, key presses); VNC on 127.0.0.1 with a password.
    display: bool = False
    vnc: bool = False
    # A disk an installer wrote (disk=): it keeps its own host name unless
    # hostname= is given.
    installed: bool = False
    # One more NIC per entry, on that kvm_vlan segment; None: a NIC on no segment
    # (what a template is made with, so that its clones can join one).
    vlans: tuple[Vlan | None, ...] = ()
    # Who runs the guest: QEMU directly ("qemu") or libvirt. ``runner`` is the run's
    # Backend of that name (None: a qemu one); ``labels`` name the guest's owner
    # where the backend records them (libvirt: the domain's metadata).
    backend: str = "qemu"
    runner: Backend | None = None
    labels: Labels = ()
    # --kvm-keep-on-failure: QEMU may outlive this process (no parent-death signal).
    keepable: bool = False

    def __post_init__(self) -> None:
        # Checked here, before a template is made or anything starts.
        if self.hostname is not None:
            check_hostname(self.hostname)


@dataclass(frozen=True)
class BootPlan:
    """A booted guest whose disk, seed and RAM file go into ``dir`` and survive it,
    with the keys given here: how a template is made."""

    dir: Path
    client_key: KeyPair
    host_key: KeyPair


class _Background:
    """Run ``target`` on a thread; ``join`` returns the exception it raised, if any."""

    def __init__(self, target: Callable[[], None]) -> None:
        self._error: BaseException | None = None
        self._target = target
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._target()
        except BaseException as exc:  # reported by join
            self._error = exc

    def join(self, timeout: float) -> BaseException | None:
        self._thread.join(timeout)
        if self._thread.is_alive():
            return TimeoutError("still running")
        return self._error


def parse_size(value: int | str | None) -> int | None:
    """Bytes from ``8G``, ``512M``, ``1048576``; None stays None."""
    if value is None:
        return None
    if isinstance(value, int):
        return value
    match = _SIZE.match(str(value))
    if not match:
        raise KvmConfigError(f"disk_size={value!r} is not a size like 8G or 512M")
    unit = " KMGT".index(match.group(2).upper() or " ")
    return int(match.group(1)) << (10 * unit)


# Find the NIC by its old or new MAC, give it the new one, then a static address.
_VLAN_SCRIPT = r"""
pytest_kvm_vlan() {
  dev=
  for d in /sys/class/net/*; do
    a=$(cat "$d/address")
    if [ "$a" = "$1" ] || [ "$a" = "$2" ]; then dev=${d##*/}; fi
  done
  if [ -z "$dev" ]; then echo "no network interface with MAC $1 or $2" >&2; return 3; fi
  ip link set dev "$dev" address "$2"
  if systemctl is-active -q systemd-networkd 2>/dev/null; then
    mkdir -p /etc/systemd/network
    printf "$4" >"/etc/systemd/network/05-pytest-kvm-$2.network"
    networkctl reload
    networkctl reconfigure "$dev"
  else
    ip address flush dev "$dev"
    ip address add "$3" dev "$dev"
    ip link set dev "$dev" up
  fi
  i=0
  until ip -o -4 address show dev "$dev" | grep -qF " ${3} "; do
    i=$((i + 1))
    if [ "$i" -gt 200 ]; then echo "$dev never got $3" >&2; return 4; fi
    sleep 0.1
  done
}
"""


# Wait for cloud-init, then print the IPv4 address of the NIC with MAC {mac} (60 s).
_SETTLE_BRIDGE = r"""
if command -v cloud-init >/dev/null; then cloud-init status --wait >/dev/null || true; fi
i=0
while [ "$i" -lt 300 ]; do
  for d in /sys/class/net/*; do
    if [ "$(cat "$d/address")" = {mac} ]; then
      a=$(ip -4 -o address show dev "${{d##*/}}" scope global |
          sed -n 's/.* inet \([0-9.]*\)\/.*/\1/p' | head -n 1)
      if [ -n "$a" ]; then echo "$a"; exit 0; fi
    fi
  done
  i=$((i + 1))
  sleep 0.2
done
echo "no IPv4 address on the NIC with MAC {mac}" >&2
exit 1
"""


def _tail_text(text: str, lines: int = 10) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


class Guest:
    """A disposable virtual machine. The constructor records; ``start()`` acts."""

    def __init__(
        self,
        run: RunContext,
        config: GuestConfig,
        name: str | None = None,
        *,
        template: Template | None = None,
        plan: BootPlan | None = None,
    ) -> None:
        if config.boot not in ("disk", "cdrom"):
            raise KvmConfigError(f"boot={config.boot!r}: use 'disk' or 'cdrom'")
        if config.boot == "cdrom" and config.cdrom is None:
            raise KvmConfigError("boot='cdrom' needs cdrom=PATH")
        if config.cdrom is not None:
            if config.boot == "cdrom":
                check_install_media(Path(config.cdrom))
            elif not Path(config.cdrom).is_file():
                raise KvmConfigError(f"cdrom={str(config.cdrom)!r} does not exist")
        if config.kernel is not None and config.boot == "cdrom":
            raise KvmConfigError("kernel= and boot='cdrom' are two ways to boot: pick one")
        if (config.initrd is not None or config.append) and config.kernel is None:
            raise KvmConfigError("initrd= and append= need kernel=")
        if config.kernel is not None and config.kernel_args:
            raise KvmConfigError("kernel= boots that kernel: give its arguments in append=")
        if config.blank:
            size = parse_size(config.disk_size)
            if size is not None and size < MIN_BLANK_DISK:
                raise KvmConfigError(
                    f"disk_size={config.disk_size!r} is too small for a disk to install "
                    f"on (at least {MIN_BLANK_DISK >> 20} MiB)"
                )
        if template is not None and (
            config.cdrom is not None or config.boot != "disk" or not config.ssh
            or config.disk_size is not None or config.kernel_args or config.blank
            or config.kernel is not None
        ):  # fmt: skip
            raise KvmConfigError(
                "cdrom, boot, ssh=False, disk_size, kernel and kernel_args need a real boot"
            )
        if config.kernel_args and config.boot_files is None:
            raise KvmConfigError("kernel_args needs the image's boot files (boot_files=)")
        if template is not None and config.image.is_encrypted:
            raise KvmConfigError(
                f"image {config.image.name}: encrypted images boot for real (a template's "
                "saved RAM would hold the decrypted disk in the clear)"
            )
        if template is not None and config.network.kind != "user":
            raise KvmConfigError(f"network {config.network}: guests boot for real (no template)")
        if template is not None and template.shape.display != (config.display or config.vnc):
            raise KvmConfigError("the template has no display (or one this guest does not)")
        if template is not None and len(template.vlan_macs) != len(config.vlans):
            raise KvmConfigError("the template has another number of vlan NICs")
        self._run = run
        self.config = config
        self.template = template
        self._plan = plan
        self._client_key = (
            plan.client_key if plan else (template.client_key if template else run.client_key)
        )
        self.name = run.identity.next_name(name)
        # A clone on user networking keeps its template's MAC (see _adopt).
        self.mac = template.mac if template else run.identity.mac_for(self.name)
        self.image = config.image
        self.backend = config.backend
        if config.runner is None and config.backend != "qemu":
            raise KvmConfigError(f"the {config.backend} backend needs its target (URI and pool)")
        self._runner = config.runner or load_backend("qemu")
        refused = self._runner.refusal("templates") if template is not None else ""
        if refused:
            raise KvmConfigError(refused)
        # A remote hypervisor: its guests' forwards are on its host's 127.0.0.1, reached
        # through that host's SSH.
        self._jump = self._runner.jump()
        # Where the test reaches the guest's SSH: the forward on 127.0.0.1 (user), or
        # the address the guest got by DHCP (bridge), learned once it has one.
        self.address = "127.0.0.1" if config.network.kind == "user" else ""
        self._mac_reservation: MacReservation | None = None
        self._tap: Tap | None = None
        self._vlan_ports: list[tuple[Vlan | None, Nic, VlanPort | None]] = []
        self._forwards: dict[int, int] = {}
        self._vlans_done = False  # the agent configured the vlan NICs already
        self.boot_timings: dict[str, float] = {}
        self.workdir: Path | None = None
        self._sockdir: Path | None = None
        self.machine: Machine | None = None
        self.console: Console
        self._ssh: SshSession | None = None
        self._host_key: KeyPair | None = None
        self._port = 0
        self._closed = False
        self._lease: Lease | None = None
        self.kept = False
        self._overlay: Path | None = None
        self._disk: GuestDisk | None = None
        self._shots = 0
        self._disk_fetched = False
        self._pid1: str | None = None  # "systemd", or PID 1's name: init_system
        # (host, port) of the VNC display (--kvm-vnc), once running.
        self.vnc: tuple[str, int] | None = None
        # Starts another guest like this one's factory: set by kvm_guest_factory, so
        # that boot_installed() can boot this guest's disk.
        self.boot_disk: Callable[..., Guest] | None = None
        scale = run.accel.timeout_scale
        self.boot_timeout = config.boot_timeout * scale
        self.timeout_scale = scale

    # -- lifecycle -------------------------------------------------------------------

    def describe(self) -> str:
        if self.config.blank:
            media = self.config.cdrom or self.config.kernel
            return f"guest {self.name!r} (installing from {Path(str(media)).name})"
        return f"guest {self.name!r} ({self.image.name})"

    def start(self) -> Guest:
        if self.workdir is not None:
            raise GuestError(f"{self.describe()}: already started", self)
        t0 = time.monotonic()
        try:
            self.workdir = self._run.guest_dir(self.name)
            self._sockdir = self._run.socket_dir(self.name)
            # Before anything starts: what a killed run leaves, `reap` finds here.
            self._lease = self._run.guest_lease(
                self.name,
                workdir=str(self.workdir),
                sockdir=str(self._sockdir),
                backend=self.backend,
                uri=self._runner.uri,
            )
            self.console = Console(
                self.workdir / "serial.log", self._sockdir / "console.sock", self.describe()
            )
            self._prepare_network()
            if self.template is not None:
                self._start_clone(self.template)
            else:
                self._start_boot()
            if self._vlan_ports and self.config.ssh and not self._vlans_done:
                t1 = time.monotonic()
                self._configure_vlans()
                self.boot_timings["vlan"] = time.monotonic() - t1
            self.boot_timings["total"] = time.monotonic() - t0
            return self
        except BaseException:
            self.close()
            raise

    def _start_boot(self) -> None:
        """Power on from the disk (or CD-ROM) and wait for SSH: a real boot."""
        assert self.workdir is not None
        t0 = time.monotonic()
        plan = self._plan
        where = plan.dir if plan else self.workdir
        image = self.image
        if self.config.blank:
            overlay = create_blank_disk(
                where / "disk.qcow2", parse_size(self.config.disk_size) or DEFAULT_BLANK_DISK
            )
        else:
            overlay = create_overlay(
                image.path, image.format, where / "disk.qcow2",
                size=self._disk_size() or (image.virtual_size if image.is_encrypted else None),
                secret=image.secret if image.is_encrypted else None,
            )  # fmt: skip
        self._overlay = overlay
        self.boot_timings["overlay"] = time.monotonic() - t0
        t1 = time.monotonic()
        self._host_key = plan.host_key if plan else KeyPair.generate(f"host-{self.name}")
        if not image.cloud_init and self.config.ssh and not self.config.blank:
            self._inject_access(overlay)
            self.boot_timings["inject"] = time.monotonic() - t1
            t1 = time.monotonic()
        drives = [Drive(overlay, "qcow2", **self._disk_keys())]
        if self.config.ssh or not self.config.blank:
            # An installer on a blank disk gets no seed: nothing would read it, and
            # it would be one more disk in the installer's list.
            seed = write_seed(
                SeedConfig(
                    instance_id=self.name,
                    hostname=self._seed_hostname(),
                    authorized_key=self._client_key.public_openssh,
                    host_key_private=self._host_key.private_openssh,
                    host_key_public=self._host_key.public_openssh,
                ),
                where / "seed.iso",
            )
            drives.append(Drive(seed, "raw", readonly=True))
            self.boot_timings["seed"] = time.monotonic() - t1
        if self.config.cdrom is not None:
            drives.append(Drive(Path(self.config.cdrom).resolve(), "raw", media="cdrom"))
        boot_files = self.config.boot_files if self.config.kernel_args else None
        if self.config.kernel is not None:
            boot_files = BootFiles(self.config.kernel, self.config.initrd, self.config.append)
        t2 = time.monotonic()
        self._launch(
            tuple(drives),
            ram_file=plan.dir / "ram" if plan else None,
            ram_shared=True,
            boot_files=boot_files,
        )
        self.boot_timings["qemu_start"] = time.monotonic() - t2
        deadline = time.monotonic() + self.boot_timeout
        if self.config.network.kind != "user" and self.config.ssh:
            t3 = time.monotonic()
            self.address = self._learn_address(deadline)
            self.boot_timings["address"] = time.monotonic() - t3
        if self.config.ssh:
            t3 = time.monotonic()
            self._connect(deadline, progress_since=t2)
            self.boot_timings["ssh_ready"] = time.monotonic() - t3
        if self.config.network.kind != "user" and self.config.ssh:
            t4 = time.monotonic()
            self._settle_bridge(deadline)
            self.boot_timings["settle"] = time.monotonic() - t4

    def _start_clone(self, template: Template) -> None:
        """Restore the template's saved state over a fresh overlay, then make it this guest."""
        assert self.workdir is not None
        t0 = time.monotonic()
        overlay = create_overlay(template.disk, "qcow2", self.workdir / "disk.qcow2")
        self._overlay = overlay
        self._host_key = template.host_key
        # The console log starts with the template's boot, so it is whole from power-on.
        log = self.workdir / "serial.log"
        shutil.copyfile(template.serial_log, log)
        with log.open("a") as out:
            out.write(f"\n[pytest-kvm] {self.name}: restored from template {template.name}\n")
        self.boot_timings["overlay"] = time.monotonic() - t0
        t1 = time.monotonic()
        drives = (Drive(overlay, "qcow2"), Drive(template.seed, "raw", readonly=True))
        self._launch(drives, ram_file=template.ram, ram_shared=False, incoming=template.state)
        self.boot_timings["restore"] = time.monotonic() - t1
        t2 = time.monotonic()
        # The guest agent makes it this guest while SSH shakes hands.
        adopt = _Background(self._adopt_by_agent) if template.agent else None
        self._connect(time.monotonic() + 60 * self.timeout_scale, waited=60 * self.timeout_scale)
        self.boot_timings["ssh_ready"] = time.monotonic() - t2
        t3 = time.monotonic()
        if adopt is None or adopt.join(90 * self.timeout_scale) is not None:  # over SSH
            result = self.run(self._adopt_script(), timeout=60)
            if result.exit_status != 0:
                raise GuestError(
                    f"{self.describe()}: could not make the restored clone its own machine "
                    f"(exit {result.exit_status}): {_tail_text(result.stderr or result.stdout)}",
                    self,
                )
        self.boot_timings["adopt"] = time.monotonic() - t3

    def _adopt_script(self) -> str:
        """Make a restored clone its own machine: the host's time and its own hostname.

        The kernel's random pool reseeds itself: QEMU gives every start a new VM
        generation ID (vmgenid). On user networking the clone keeps the template's
        MAC: the slirp ARP and DHCP tables restored with it hold that MAC, and a
        guest that changes its MAC at run time loses its network."""
        hostname = shlex.quote(self.config.hostname or self.name[:63])
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
        assert self._sockdir is not None
        hostname = (self.config.hostname or self.name[:63]) + "\n"
        with self._agent() as agent:
            agent.connect(10 * self.timeout_scale)
            started = agent.execute(
                "guest-exec", path="/bin/date", arg=["-u", "-s", f"@{time.time():.6f}"]
            )
            agent.write_file("/proc/sys/kernel/hostname", hostname)
            agent.write_file("/etc/hostname", hostname)
            with contextlib.suppress(GuestAgentError):  # an image without cloud-init
                agent.write_file(
                    "/etc/cloud/cloud.cfg.d/99-pytest-kvm-clone.cfg", "preserve_hostname: true\n"
                )
            self._agent_wait(agent, started["pid"], "date", 20 * self.timeout_scale)
            if self._vlan_ports:  # while SSH still shakes hands
                started = agent.execute(
                    "guest-exec", path="/bin/sh", arg=["-c", self._vlan_script()],
                    **{"capture-output": True},
                )  # fmt: skip
                self._agent_wait(agent, started["pid"], "the vlan set-up", 60 * self.timeout_scale)
                self._vlans_done = True

    @staticmethod
    def _agent_wait(agent: AgentCalls, pid: int, what: str, timeout: float) -> None:
        """Until a guest-exec'd process ends; raises if it failed or took too long."""
        deadline = time.monotonic() + timeout
        while True:
            status = agent.execute("guest-exec-status", pid=pid)
            if status.get("exited"):
                if status.get("exitcode") != 0:
                    err = base64.b64decode(status.get("err-data", "")).decode(errors="replace")
                    raise GuestAgentError(f"{what} exited {status.get('exitcode')}: {err}")
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} did not finish")
            time.sleep(0.01)

    def _wait_connections_closed(self, timeout: float) -> None:
        """Until QEMU's user network has no TCP connection left (only its forwards), so
        that no clone starts with the template's SSH connection half-open."""
        assert self.machine is not None
        if self.config.network.kind != "user":
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            table = self.machine.qmp("human-monitor-command", **{"command-line": "info usernet"})
            if not any(
                line.strip().startswith("TCP[") and "HOST_FORWARD" not in line
                for line in str(table).splitlines()
            ):
                return
            time.sleep(0.05)

    def _agent(self) -> AgentCalls:
        """A connection to the guest's qemu-ga: its socket, or through libvirt."""
        assert self.machine is not None
        return self.machine.agent()

    def agent_answers(self, timeout: float = 5.0) -> bool:
        """Whether qemu-ga answers on the guest's agent channel."""
        assert self._sockdir is not None
        try:
            with self._agent() as agent:
                agent.connect(timeout * self.timeout_scale)
                agent.execute("guest-ping", timeout=timeout * self.timeout_scale)
            return True
        except (OSError, TimeoutError, GuestAgentError):
            return False

    def save_state(self, path: Path) -> None:
        """Close SSH, pause the guest, write its device state to ``path``, stop QEMU.

        RAM is not in the file: it stays in the guest's shared RAM file."""
        machine = self.machine
        saver = machine.state_saver() if machine is not None else None
        if machine is None or saver is None:
            raise GuestError(f"{self.describe()}: its backend cannot save a template", self)
        if self._ssh is not None:
            self._ssh.close()
            self._ssh = None
        self._wait_connections_closed(10 * self.timeout_scale)
        saver.save_state(path, timeout=120 * self.timeout_scale)
        machine.qmp("quit")
        if not machine.wait_for_exit(30 * self.timeout_scale):
            raise GuestError(f"{self.describe()}: QEMU did not quit after saving", self)

    def _disk_keys(self) -> dict[str, Any]:
        """Drive arguments for this guest's overlay: the keys of an encrypted chain."""
        if not self.image.is_encrypted or self.config.blank:  # a blank disk is plain
            return {}
        return {"encrypted": (True, *self.image.encrypted), "secret": self.image.secret}

    def _disk_source(self, overlay: Path) -> DiskSource:
        keys = self._disk_keys()
        return DiskSource(overlay, "qcow2", keys.get("encrypted", ()), keys.get("secret"))

    def _inject_access(self, overlay: Path) -> None:
        """An image without cloud-init: write what the seed would have set up."""
        assert self._host_key is not None
        source = self._disk_source(overlay)
        access = Access(
            user=self.config.user,
            authorized_key=self._client_key.public_openssh,
            host_key_private=self._host_key.private_openssh,
            host_key_public=self._host_key.public_openssh,
            hostname=self._seed_hostname(),
        )
        with DiskHandle(source, readonly=False, force_tcg=self._run.accel.name != "kvm",
                        what=f"the disk of {self.describe()}") as disk:  # fmt: skip
            inject_access(disk, access)

    @property
    def disk(self) -> GuestDisk:
        """The stopped guest's disk, read-only through libguestfs: ``read_text(path)``,
        ``ls(path)``, ``exists(path)``, ``journal()``. Stop the guest first
        (``shutdown()`` or ``kill()``); it is readable until the guest is closed."""
        if self._closed or self._overlay is None:
            raise GuestError(f"{self.describe()}: has no disk (not started, or closed)", self)
        if self.is_running:
            raise GuestError(
                f"{self.describe()}: guest.disk reads a stopped guest's disk; "
                "call guest.shutdown() or guest.kill() first",
                self,
            )
        if self._disk is None:
            self._disk = GuestDisk(self._disk_source(self._fetch_disk()),
                                   self._run.accel.name != "kvm",
                                   f"the disk of {self.describe()}")  # fmt: skip
        return self._disk

    def _fetch_disk(self) -> Path:
        """The stopped guest's disk as a local file: on libvirt the overlay lives in
        the pool and is downloaded once."""
        assert self._overlay is not None
        if self.machine is not None and self.machine.disk_is_remote and not self._disk_fetched:
            backing = None if self.config.blank else self.image.path
            self.machine.fetch_disk(self._overlay, backing)
            self._disk_fetched = True
        return self._overlay

    def answers_ssh(self, timeout: float = 10) -> bool:
        """Whether the guest runs ``true`` over its open SSH connection within
        ``timeout`` seconds (not scaled, no reconnecting): a quick look before work
        that would otherwise wait out long timeouts on a guest whose network is gone."""
        ssh = self._ssh
        if not self.is_running or ssh is None or not ssh.is_active():
            return False
        try:
            return ssh.exec("true", timeout, alive=self._alive).exit_status == 0
        except (CommandTimeout, OSError, EOFError, paramiko.SSHException):
            return False

    def journal_text(self, timeout: float = 60, ssh: bool = True) -> tuple[str, str]:
        """The journal of the guest's current boot and where it came from: over SSH
        while it answers; else the guest is stopped (after a sync through the guest
        agent where that answers) and its journal is read from its disk.
        ``ssh=False`` goes to the disk at once (for a caller that knows SSH is gone)."""
        session = self._ssh if ssh else None
        if self.is_running and session is not None and session.is_active():
            # Straight on the session: no reconnecting, no waiting scaled for TCG.
            with contextlib.suppress(CommandTimeout, OSError, EOFError, paramiko.SSHException):
                raw = session.exec("journalctl -b --no-pager -o short", timeout, alive=self._alive)
                if raw.exit_status == 0:
                    return raw.stdout, "journalctl over SSH"
        synced = ""
        if self.is_running:
            # A panicked guest answers neither SSH nor its agent: do not wait for them.
            dead = self._alive()
            synced = (
                f" ({dead}: the last entries may be missing)"
                if dead
                else self._sync_by_agent(timeout)
            )
            self.kill()
        return self.disk.journal(), f"the disk, read with libguestfs{synced}"

    def _sync_by_agent(self, timeout: float) -> str:
        """Ask journald and the kernel to write everything to disk, through qemu-ga."""
        if self._sockdir is None:
            return ""
        try:
            with self._agent() as agent:
                agent.connect(5 * self.timeout_scale)
                started = agent.execute(
                    "guest-exec", path="/bin/sh", arg=["-c", "journalctl --sync; sync"]
                )
                self._agent_wait(agent, started["pid"], "journalctl --sync", timeout)
        except (GuestAgentError, GuestError, OSError):
            return " (the guest agent did not answer: the last entries may be missing)"
        return " after journalctl --sync through the guest agent"

    def _seed_hostname(self) -> str | None:
        """The host name the guest is given: hostname=, else its name; an installed
        disk keeps the one its installer set."""
        if self.config.hostname:
            return self.config.hostname
        return None if self.config.installed else self.name[:63]

    def _disk_size(self) -> int | None:
        size = parse_size(self.config.disk_size)
        if size is not None and size < self.image.virtual_size:
            raise KvmConfigError(
                f"{self.describe()}: disk_size {size} bytes is smaller than the image "
                f"({self.image.virtual_size} bytes)"
            )
        return size

    def _launch(
        self,
        drives: tuple[Drive, ...],
        ram_file: Path | None = None,
        ram_shared: bool = False,
        incoming: Path | None = None,
        boot_files: BootFiles | None = None,
    ) -> None:
        assert self.workdir is not None
        tap_fd = self._tap.open() if self._tap is not None else None
        try:
            self._launch_qemu(drives, ram_file, ram_shared, incoming, boot_files, tap_fd)
        finally:
            if self._tap is not None:
                self._tap.close()  # QEMU holds the tap now; it goes when QEMU exits

    def _launch_qemu(
        self,
        drives: tuple[Drive, ...],
        ram_file: Path | None,
        ram_shared: bool,
        incoming: Path | None,
        boot_files: BootFiles | None,
        tap_fd: int | None,
    ) -> None:
        assert self.workdir is not None
        user = self.config.network.kind == "user"
        if self.config.vnc:
            # Read by the backend (libvirt puts it in the domain XML; for QEMU it is
            # set over QMP once running): never argv, never a log.
            secret = self.workdir / "vnc-password"
            with contextlib.suppress(FileNotFoundError):
                secret.unlink()
            fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(vnc_password() + "\n")
        for attempt in range(5 if user else 1):
            self._port = free_port() if user else 22
            spec = MachineSpec(
                name=self.name,
                workdir=self.workdir,
                drives=drives,
                memory=self.config.memory,
                cpus=self.config.cpus,
                accel=self._run.accel.name,
                network=self.config.network,
                mac=self.mac,
                ssh_port=self._port,
                boot=self.config.boot,
                sockdir=self._sockdir,
                ram_file=ram_file,
                ram_shared=ram_shared,
                incoming=incoming,
                kernel=boot_files.kernel if boot_files else None,
                initrd=boot_files.initrd if boot_files else None,
                append=f"{boot_files.cmdline} {self.config.kernel_args}".strip()
                if boot_files
                else "",
                tap_fd=tap_fd,
                nics=tuple(nic for _, nic, _ in self._vlan_ports),
                display=self.config.display or self.config.vnc,
                vnc=self.config.vnc,
                die_with_parent=not self.config.keepable,
            )
            machine = self._runner.machine(
                spec, on_spawn=self._record_qemu, labels=self.config.labels
            )
            self._record(**machine.lease_fields())  # before it exists
            try:
                self.machine = machine  # closed with the guest, also if start fails
                machine.start()
                if user and machine.forwards_ssh_after_start:
                    self._forward_ssh(machine)
            except GuestLaunchError as exc:
                exc.guest = self
                # Another process took the port between our check and QEMU's bind.
                if "host forwarding rule" in str(exc) and attempt < 4:
                    continue
                raise
            self.machine = machine
            if self._tap is not None:
                self._record(tap=self._tap.ifname)
            if self.config.vnc:
                self._start_vnc()
            return

    def _record(self, **fields: object) -> None:
        """What a reaper needs to end this guest if our process dies: in its lease."""
        if self._lease is not None:
            self._lease.update(**fields)

    def _record_qemu(self, pid: int) -> None:
        # Called right after QEMU is spawned, before start() waits for it: a kept
        # guest's QEMU has no parent-death signal, so a SIGKILL of this process from
        # here on would leave it running with nobody else knowing its PID.
        self._record(qemu_pid=pid, qemu_start=process_start(pid))

    def _forward_ssh(self, machine: Machine) -> None:
        """SSH on 127.0.0.1 of the libvirt host, added once the domain runs."""
        for attempt in range(5):
            try:
                machine.forward(self._port, 22)
                return
            except GuestLaunchError:
                if attempt == 4:
                    raise
                self._port = free_port()  # taken since we looked

    def _alive(self) -> str:
        """ "" while the guest may still answer; else what happened to it."""
        machine = self.machine
        if machine is None:
            return f"{self.describe()} was never started"
        panic = _PANIC.search(tail(self.console.log_path, 60))
        if panic:
            return f"{self.describe()} panicked: {panic.group(0)}"
        if not machine.is_running():
            return f"{self.describe()}: QEMU exited (status {machine.exit_code()})"
        return ""

    def _crash_lines(self, lines: int = 20) -> str:
        """The console lines that tell what happened: from just before a panic's first
        line (its cause, the faulting task, the call trace), else the last ``lines``."""
        text = tail(self.console.log_path, 80).splitlines()
        for index, line in enumerate(text):
            if _PANIC.search(line):
                start = max(0, index - 3)
                return "\n".join(text[start : start + lines])
        return "\n".join(text[-lines:])

    def _connect(
        self,
        deadline: float,
        *,
        waited: float | None = None,
        again: bool = False,
        lost: str | None = None,
        progress_since: float | None = None,
    ) -> None:
        """SSH until ``deadline``. The timeout error says what was waited for and how
        long (``waited``, default the boot timeout): the boot, SSH ``again`` after a
        reconnect, or the command ``lost`` that found its connection gone. With
        ``progress_since`` (a real boot's power-on), a long wait prints a line now and
        then: what it waits for, the last console line and the time since."""
        assert self._host_key is not None
        session = SshSession(self.address, self._port, self.config.user,
                             self._client_key, self._host_key, self._jump)  # fmt: skip
        next_line = (progress_since or 0.0) + WAIT_PROGRESS_EVERY

        def alive_and_progress() -> str:  # called between connection attempts
            nonlocal next_line
            now = time.monotonic()
            if progress_since is not None and now >= next_line:
                next_line = now + WAIT_PROGRESS_EVERY
                self._run.progress(
                    waiting_line(self.name, "SSH", self.console.log_path, now - progress_since)
                )
            return self._alive()

        try:
            session.connect(deadline, alive=alive_and_progress)
        except ConnectionAbortedError as exc:
            raise GuestCrashed(f"{exc}; console:\n{self._crash_lines()}", self) from None
        except GuestTimeout as exc:
            limit = self.boot_timeout if waited is None else waited
            if lost is not None:
                what = (
                    f"command {lost!r}: the SSH connection was lost and SSH did not answer "
                    f"again within {limit:.0f} s"
                )
            elif again:
                what = f"SSH did not answer again within {limit:.0f} s"
            else:
                what = f"not SSH-ready after {limit:.0f} s"
            hint = "; the console is still reachable as guest.console" if again or lost else ""
            raise GuestTimeout(
                f"{self.describe()}: {what} ({exc}){hint}; "
                f"last console lines:\n{tail(self.console.log_path, 20)}",
                self,
            ) from None
        except JumpFailed as exc:
            raise GuestError(f"{self.describe()}: {exc}", self) from None
        except paramiko.BadHostKeyException as exc:
            raise GuestError(
                f"{self.describe()}: the host on {self.address}:{self._port} offered host key "
                f"{exc.key.get_fingerprint().hex()}, not the one pinned for this guest; "
                "refusing to connect",
                self,
            ) from None
        self._ssh = session

    def close(self) -> None:
        """Stop the guest and remove everything it had; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._disk is not None:
                self._disk.close()
            if self._ssh is not None:
                self._ssh.close()
            if hasattr(self, "console"):
                self.console.close()
        finally:
            try:
                if self.machine is not None:
                    self.machine.close()
            finally:
                if self._tap is not None:
                    self._tap.close()
                for vlan, _, _ in self._vlan_ports:
                    if vlan is not None:
                        vlan.detach(self.name)
                if self._mac_reservation is not None:
                    self._mac_reservation.release()
                for path in (self.workdir, self._sockdir):
                    if path is not None:
                        shutil.rmtree(path, ignore_errors=True)
                if self._lease is not None:
                    self._lease.remove()

    def __enter__(self) -> Guest:
        return self.start() if self.workdir is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- network ------------------------------------------------------------------------

    def _prepare_network(self) -> None:
        """Check the network, reserve the bridge MAC and tap, attach to vlans."""
        assert self._sockdir is not None
        spec = self.config.network
        if self.config.backend == "libvirt" and spec.kind != "user":
            # libvirt makes the tap; a MAC of our own, kept off local bridges' FDBs.
            if spec.kind == "bridge" and spec.helper:
                raise KvmConfigError(
                    f"{self.describe()}: network {spec}: the libvirt backend makes its own "
                    "taps; drop ',helper'"
                )
            local = self._jump is None and spec.kind == "bridge"
            self._mac_reservation = MacReservation.reserve(
                taken=bridge_fdb_macs(spec.name) if local else set()
            )
            self.mac = self._mac_reservation.mac
        elif spec.kind == "bridge":
            problem = bridge_problem(spec.name)
            if problem:
                raise KvmConfigError(f"{self.describe()}: network {spec}: {problem}")
            if spec.helper:
                reason = helper_problem(spec.helper, spec.name)
                if reason:
                    raise KvmConfigError(f"{self.describe()}: network {spec}: {reason}")
            elif has_net_admin():
                self._tap = Tap(spec.name)
            else:
                reason = helper_problem(DEFAULT_BRIDGE_HELPER, spec.name)
                if reason:
                    raise KvmConfigError(f"{self.describe()}: {no_tap_message(spec.name, reason)}")
                self.config = dataclasses.replace(
                    self.config, network=dataclasses.replace(spec, helper=DEFAULT_BRIDGE_HELPER)
                )
            self._mac_reservation = MacReservation.reserve(taken=bridge_fdb_macs(spec.name))
            self.mac = self._mac_reservation.mac
        elif spec.kind != "user":
            raise KvmConfigError(
                f"{self.describe()}: network {spec} is not supported by the qemu backend"
            )
        for index, vlan in enumerate(self.config.vlans):
            netdev_id = f"vlan{index}"
            mac = self._run.identity.mac_for(f"{self.name}/{netdev_id}")
            if vlan is None:  # a template's NIC: on a hub of its own, connected to nothing
                nic = Nic(netdev_id, f"hubport,id={netdev_id},hubid={index + 1}", mac)
                self._vlan_ports.append((None, nic, None))
                continue
            port = vlan.attach(self.name, netdev_id, mac, self._sockdir / f"{netdev_id}.sock")
            self._vlan_ports.append((vlan, Nic(netdev_id, port.netdev_arg(), mac), port))

    def _learn_address(self, deadline: float) -> str:
        """The IPv4 address the guest's NIC got by DHCP: from the guest agent, or from
        cloud-init's network table on the console."""
        assert self._sockdir is not None
        agent: AgentCalls | None = None
        seen = "the guest agent never answered"
        try:
            while True:
                dead = self._alive()
                if dead:
                    raise GuestCrashed(
                        f"{dead}; last console lines:\n{tail(self.console.log_path, 20)}", self
                    )
                address = ipv4_from_console(tail(self.console.log_path, 200), self.mac)
                if not address and self.machine is not None:
                    address = self.machine.leased_address(self.mac)  # the backend's DHCP
                if address:
                    return address
                try:
                    if agent is None:
                        agent = self._agent()
                        agent.connect(2.0)
                    interfaces = agent.execute("guest-network-get-interfaces", timeout=5.0)
                    address = ipv4_from_agent(interfaces or [], self.mac)
                    if address:
                        return address
                    seen = f"the guest agent reported no IPv4 address for MAC {self.mac}"
                except (OSError, TimeoutError, GuestAgentError) as exc:
                    if agent is not None:
                        agent.close()
                    agent = None
                    if not isinstance(exc, TimeoutError):
                        seen = f"the guest agent: {exc}"
                if time.monotonic() > deadline:
                    raise GuestTimeout(
                        f"{self.describe()}: no DHCP address on {self.config.network} "
                        f"for MAC {self.mac} after "
                        f"{self.boot_timeout:.0f} s ({seen}); is a DHCP server on that "
                        f"segment? Last console lines:\n{tail(self.console.log_path, 20)}",
                        self,
                    )
                time.sleep(1.0)
        finally:
            if agent is not None:
                agent.close()

    def _settle_bridge(self, deadline: float) -> None:
        """A bridge guest is ready once cloud-init is done and its DHCP address holds:
        while cloud-init still runs, the guest's network may still change under a
        test that reaches it from outside (seen: an address gone for a moment)."""
        remaining = max(30.0, deadline - time.monotonic())
        result = self.run(_SETTLE_BRIDGE.format(mac=shlex.quote(self.mac)),
                          timeout=remaining / self.timeout_scale)  # fmt: skip
        address = result.stdout.strip()
        if result.exit_status != 0 or not address:
            raise GuestTimeout(
                f"{self.describe()}: its NIC {self.mac} on bridge "
                f"{self.config.network.name!r} lost its IPv4 address {self.address} while "
                f"booting and did not get one back: {_tail_text(result.stderr, 3)}",
                self,
            )
        if address != self.address:
            self.address = address
            self._session().close()
            self._connect(deadline)

    def _configure_vlans(self) -> None:
        """Give each vlan NIC its MAC and static address inside the guest.

        A clone's NIC still has its template's MAC: the guest sets the new one (QEMU
        follows it). With systemd-networkd the address goes into a .network file,
        so it survives carrier loss (``set_link``) and reboots; otherwise ``ip``."""
        result = self.run(self._vlan_script(), timeout=60)
        if result.exit_status != 0:
            raise GuestError(
                f"{self.describe()}: could not configure its vlan NICs "
                f"(exit {result.exit_status}): {_tail_text(result.stderr or result.stdout)}",
                self,
            )

    def _vlan_script(self) -> str:
        lines = ["set -e"]
        for index, (_, nic, port) in enumerate(self._vlan_ports):
            if port is None:
                continue
            old = self.template.vlan_macs[index] if self.template is not None else nic.mac
            cidr = f"{port.address}/{port.prefixlen}"
            unit = (
                f"[Match]\\nMACAddress={nic.mac}\\n[Link]\\nRequiredForOnline=no\\n"
                f"[Network]\\nAddress={cidr}\\nLinkLocalAddressing=no\\nIPv6AcceptRA=no\\n"
                "ConfigureWithoutCarrier=yes\\nIgnoreCarrierLoss=yes\\n"
            )
            lines.append(
                f"pytest_kvm_vlan {shlex.quote(old)} {shlex.quote(nic.mac)} "
                f"{shlex.quote(cidr)} {shlex.quote(unit)}"
            )
        return _VLAN_SCRIPT + "\n".join(lines)

    @property
    def host_address(self) -> str | None:
        """The address at which the guest reaches the host (user networking only):
        a connection to ``host_address:PORT`` arrives at 127.0.0.1:PORT on the host."""
        return USER_NET_HOST if self.config.network.kind == "user" else None

    @property
    def vlan_macs(self) -> tuple[str, ...]:
        """The MACs of the guest's vlan NICs, in order."""
        return tuple(nic.mac for _, nic, _ in self._vlan_ports)

    @property
    def forwarded_ports(self) -> dict[int, int]:
        """guest port -> host port on 127.0.0.1, SSH's included."""
        ports = {22: self._port} if self.config.network.kind == "user" else {}
        return {**ports, **self._forwards}

    def forward_port(self, guest_port: int, host_port: int | None = None) -> int:
        """Forward TCP ``127.0.0.1:host_port`` on the host to ``guest_port`` in the
        guest (user networking); returns the host port, chosen free if not given."""
        __tracebackhide__ = True
        check_port_number(guest_port, "guest_port")
        what = f"{self.describe()}: forward_port({guest_port}"
        if self.config.network.kind != "user":
            raise KvmConfigError(
                f"{what}): forwarding is for user networking; on {self.config.network} "
                f"reach the guest at guest.address ({self.address}) directly"
            )
        if host_port is not None:
            check_port_number(host_port, "host_port")
            what += f", host_port={host_port})"
            if self._jump is None and port_in_use(host_port):
                raise KvmConfigError(f"{what}: 127.0.0.1:{host_port} is already in use on the host")
        else:
            what += ")"
        answer = ""
        for _ in range(5):
            port = host_port or free_port()
            rule = f"tcp:127.0.0.1:{port}-:{guest_port}"
            answer = str(
                self.qmp(
                    "human-monitor-command",
                    **{"command-line": f"hostfwd_add {self._primary_netdev} {rule}"},
                )
            )
            if not answer.strip():
                self._forwards[guest_port] = port
                return port
            if host_port is not None:
                break
        raise GuestError(f"{what}: QEMU refused: {answer.strip()}", self)

    @property
    def _primary_netdev(self) -> str:
        assert self.machine is not None
        return self.machine.primary_netdev

    def set_link(self, up: bool, vlan: Vlan | None = None) -> None:
        """Plug (``up=True``) or pull the virtual cable of a NIC: the one on ``vlan``;
        by default the guest's only vlan NIC, or its primary NIC if it has none (on
        user and bridge networks that also cuts the test's SSH)."""
        ports = [(v, nic) for v, nic, port in self._vlan_ports if port is not None]
        if vlan is not None:
            matching = [nic for v, nic in ports if v is vlan]
            if not matching:
                raise KvmConfigError(f"{self.describe()}: set_link: not on vlan {vlan.name!r}")
            netdev = matching[0].netdev_id
        elif len(ports) == 1:
            netdev = ports[0][1].netdev_id
        elif not ports:
            netdev = self._primary_netdev
        else:
            raise KvmConfigError(
                f"{self.describe()}: set_link: the guest is on {len(ports)} vlans; say which"
            )
        self.qmp("set_link", name=netdev, up=bool(up))

    # -- facts --------------------------------------------------------------------------

    @property
    def serial_log(self) -> Path:
        return self.console.log_path

    @property
    def ssh(self) -> paramiko.SSHClient:
        return self._session().client

    @property
    def ssh_port(self) -> int:
        return self._port

    @property
    def known_hosts(self) -> Path:
        assert self.workdir is not None and self._ssh is not None
        path = self.workdir / "known_hosts"
        if not path.exists():
            path.write_text(self._ssh.known_hosts_line())
            path.chmod(0o600)
        return path

    @property
    def ssh_command(self) -> str:
        """A command line a person can paste into a shell to reach this guest."""
        argv = [
            "ssh", "-i", str(self._client_key.path), "-p", str(self._port),
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
            from .osrelease import parse_os_release

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
            from .testinfra_backend import make_host

            host = self.__dict__["_testinfra_host"] = make_host(self)
        return host

    # -- commands -------------------------------------------------------------------

    def _session(self) -> SshSession:
        if self._ssh is None:
            raise GuestError(f"{self.describe()}: no SSH connection (started with ssh=False?)")
        return self._ssh

    def run(self, cmd: str, timeout: float = 60) -> CommandResult:
        """Run ``cmd`` with the guest's shell; never raises for a non-zero exit."""
        __tracebackhide__ = True
        session = self._session()
        limit = timeout * self.timeout_scale
        if not session.is_active():
            # The connection was lost (sshd restarted or killed, the network down, a
            # reboot): wait for SSH again, at most as long as the command may take.
            self._reconnect(min(30.0, timeout) * self.timeout_scale, lost=cmd)
            session = self._session()
        try:
            raw = session.exec(cmd, limit, alive=self._alive)
        except GuestDied as exc:
            # Panicked (frozen: the TCP connection stays open) or QEMU exited.
            raise GuestCrashed(
                f"{exc.reason}; command {cmd!r} was running; console:\n{self._crash_lines()}",
                self,
            ) from None
        except CommandTimeout as exc:
            raise GuestTimeout(
                f"{self.describe()}: command {cmd!r} did not finish within {limit:.0f} s; "
                f"output so far: {_tail_text(exc.stdout, 5)!r} {_tail_text(exc.stderr, 5)!r}",
                self,
            ) from None
        except (OSError, EOFError, paramiko.SSHException) as exc:
            dead = self._alive()
            if dead:
                raise GuestCrashed(
                    f"{dead}; command {cmd!r} was running; console:\n{self._crash_lines()}",
                    self,
                ) from None
            raise GuestError(
                f"{self.describe()}: command {cmd!r}: SSH failed ({type(exc).__name__}: {exc}); "
                "the console is still reachable as guest.console",
                self,
            ) from None
        return CommandResult(cmd, raw.exit_status, raw.stdout, raw.stderr)

    def reconnect(self) -> None:
        """Close the SSH connection and open a new one."""
        self._reconnect(60 * self.timeout_scale)

    def _reconnect(self, timeout: float, lost: str | None = None) -> None:
        """A new SSH connection within ``timeout`` s; ``lost``: the command that found
        the old one gone (the error then says so)."""
        self._session().close()
        dead = self._alive()
        if dead:
            raise GuestCrashed(f"{dead}; console:\n{self._crash_lines()}", self)
        self._connect(time.monotonic() + timeout, waited=timeout, again=True, lost=lost)

    def succeed(self, cmd: str, timeout: float = 60) -> str:
        """Run ``cmd``; return its stdout, or raise CommandFailed with both output tails."""
        __tracebackhide__ = True
        result = self.run(cmd, timeout)
        if result.exit_status != 0:
            detail = _tail_text(result.stderr) or _tail_text(result.stdout) or "no output"
            raise CommandFailed(
                f"{self.describe()}: command {cmd!r} failed (exit {result.exit_status}): {detail}",
                self,
                command=cmd,
                exit_status=result.exit_status,
                stdout=_tail_text(result.stdout, 40),
                stderr=_tail_text(result.stderr, 40),
            )
        return result.stdout

    def fail(self, cmd: str, timeout: float = 60) -> str:
        """Run ``cmd``; it must fail. Returns its stderr (or stdout if stderr is empty)."""
        __tracebackhide__ = True
        result = self.run(cmd, timeout)
        if result.exit_status == 0:
            raise CommandFailed(
                f"{self.describe()}: command {cmd!r} succeeded but was expected to fail: "
                f"{_tail_text(result.stdout) or 'no output'}",
                self,
                command=cmd,
                exit_status=0,
                stdout=_tail_text(result.stdout, 40),
                stderr=_tail_text(result.stderr, 40),
            )
        return result.stderr or result.stdout

    def wait_until_succeeds(self, cmd: str, timeout: float = 120) -> str:
        """Retry ``cmd`` until it exits 0; the timeout error shows the last attempt."""
        __tracebackhide__ = True
        last: CommandResult | None = None

        def attempt() -> bool:
            nonlocal last
            last = self.run(cmd, timeout=max(timeout, 10))
            return last.exit_status == 0

        self._retry(attempt, timeout, lambda: f"command {cmd!r} never succeeded", lambda: last)
        assert last is not None
        return last.stdout

    @property
    def init_system(self) -> str:
        """``"systemd"`` if systemd runs the guest (``/run/systemd/system`` exists),
        else the name of PID 1 (``"init"`` for sysvinit). Asked once per guest."""
        if self._pid1 is None:
            found = self.succeed(
                "if test -d /run/systemd/system; then echo systemd; else cat /proc/1/comm; fi",
                timeout=30,
            ).strip()
            self._pid1 = found or "unknown"
        return self._pid1

    def wait_for_unit(self, unit: str, timeout: float = 120) -> None:
        """Wait until a systemd unit is active; a failed unit raises at once.

        On a guest without systemd (sysvinit) it raises GuestError at once: there
        are no units to ask about, and guessing from init scripts could be wrong."""
        __tracebackhide__ = True
        q = shlex.quote(unit)
        if self.init_system != "systemd":
            service = unit.removesuffix(".service")
            raise GuestError(
                f"{self.describe()}: wait_for_unit({unit!r}) needs systemd, but this guest "
                f"has no systemd (PID 1 is {self.init_system!r}, no /run/systemd/system); "
                f"wait for its init script instead, e.g. "
                f"guest.wait_until_succeeds({f'service {shlex.quote(service)} status'!r})",
                self,
            )
        last: CommandResult | None = None

        def attempt() -> bool:
            nonlocal last
            last = self.run(f"systemctl is-active {q}", timeout=30)
            state = last.stdout.strip()
            if state == "failed":
                status = self.run(f"systemctl status --no-pager --lines=10 {q}", timeout=30)
                raise CommandFailed(
                    f"{self.describe()}: unit {unit!r} failed:\n{_tail_text(status.stdout, 15)}",
                    self,
                    command=last.command,
                    exit_status=last.exit_status,
                    stdout=status.stdout,
                )
            return state == "active"

        self._retry(attempt, timeout, lambda: f"unit {unit!r} never became active", lambda: last)

    def wait_for_port(self, port: int, timeout: float = 120) -> None:
        """Wait until something in the guest listens on TCP ``port``."""
        __tracebackhide__ = True
        if not 0 < int(port) < 65536:
            raise KvmConfigError(f"port {port!r} is not a TCP port number")
        cmd = f"ss -Htln {shlex.quote(f'sport = :{int(port)}')} | grep -q ."
        last: CommandResult | None = None

        def attempt() -> bool:
            nonlocal last
            last = self.run(cmd, timeout=30)
            return last.exit_status == 0

        self._retry(attempt, timeout, lambda: f"nothing listened on port {port}", lambda: last)

    def wait_for_console(self, regex: str | re.Pattern[str], timeout: float = 120) -> re.Match[str]:
        __tracebackhide__ = True
        return self.console.expect(regex, timeout * self.timeout_scale)

    def _retry(
        self,
        attempt: Callable[[], bool],
        timeout: float,
        what: Callable[[], str],
        last: Callable[[], CommandResult | None],
    ) -> None:
        __tracebackhide__ = True
        limit = timeout * self.timeout_scale
        deadline = time.monotonic() + limit
        delay = 0.2
        while True:
            last_try = time.monotonic() >= deadline
            if attempt():
                return
            if last_try:
                seen = last()
                observed = (
                    f" (last exit {seen.exit_status}: "
                    f"{_tail_text(seen.stdout + seen.stderr, 3) or 'no output'})"
                    if seen
                    else ""
                )
                raise GuestTimeout(
                    f"{self.describe()}: {what()} within {limit:.0f} s{observed}", self
                )
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 1.5, 2.0)

    # -- files -------------------------------------------------------------------------

    def _check_remote(self, op: str, remote: object) -> None:
        """A guest path for SFTP: text, not empty, no NUL (which ends the SFTP session)."""
        if not isinstance(remote, str) or not remote or "\0" in remote:
            raise KvmConfigError(
                f"{self.describe()}: {op}: remote path {remote!r} is not a path "
                "(a non-empty string without NUL)"
            )

    def put(self, local: str | Path, remote: str, timeout: float = 300) -> None:
        """Copy the host file ``local`` to ``remote`` in the guest by SFTP, within
        ``timeout`` s (scaled under TCG); a guest that dies meanwhile is
        ``GuestCrashed`` within about a second."""
        local_path = Path(local)
        if not local_path.is_file():
            raise KvmConfigError(f"{self.describe()}: put: {str(local)!r} is not a file")
        self._check_remote("put", remote)
        what = f"put {str(local)!r} -> {remote!r}"
        self._transfer(what, lambda s, t: s.put(local_path, remote, t, alive=self._alive), timeout)

    def get(self, remote: str, local: str | Path, timeout: float = 300) -> Path:
        """Copy ``remote`` in the guest to the host file ``local`` by SFTP, like ``put``."""
        local_path = Path(local)
        self._check_remote("get", remote)
        what = f"get {remote!r} -> {str(local)!r}"
        try:
            self._transfer(
                what, lambda s, t: s.get(remote, local_path, t, alive=self._alive), timeout
            )
        except GuestError:
            local_path.unlink(missing_ok=True)
            raise
        return local_path

    def _transfer(
        self, what: str, transfer: Callable[[SshSession, float], None], timeout: float
    ) -> None:
        """Run an SFTP ``transfer`` on the guest's session; its failures as GuestErrors."""
        limit = timeout * self.timeout_scale
        session = self._session()
        if not session.is_active():  # lost (a reboot, sshd restarted): as in ``run``
            self._reconnect(min(30.0, timeout) * self.timeout_scale, lost=what)
            session = self._session()
        try:
            transfer(session, limit)
        except GuestDied as exc:
            raise GuestCrashed(
                f"{exc.reason}; {what} was running; console:\n{self._crash_lines()}", self
            ) from None
        except TransferTimeout:
            raise GuestTimeout(
                f"{self.describe()}: {what} did not finish within {limit:.0f} s "
                "(the SSH connection was closed; the next command makes a new one)",
                self,
            ) from None
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise GuestError(f"{self.describe()}: {what}: {exc}", self) from None

    # -- power -------------------------------------------------------------------------

    def reboot(self, timeout: float | None = None) -> None:
        """Reboot the guest and wait until it answers SSH again (a new boot)."""
        __tracebackhide__ = True
        old_boot = self.succeed("cat /proc/sys/kernel/random/boot_id").strip()
        self.console.skip_to_end()
        # Detach so the command returns before sshd goes away.
        try:
            self.run(
                "systemd-run --no-block systemctl reboot || (sleep 1; reboot) >/dev/null 2>&1 &"
            )
        except GuestCrashed:
            raise
        except GuestError:  # the reboot took the connection before the command returned
            pass
        self._session().close()
        limit = (timeout or self.config.boot_timeout) * self.timeout_scale
        deadline = time.monotonic() + limit
        while True:
            self._connect(deadline)
            try:
                now = self.run("cat /proc/sys/kernel/random/boot_id").stdout.strip()
            except (GuestCrashed, GuestTimeout):
                raise
            except GuestError:  # reached the old boot's sshd as it went away
                now = ""
            if now and now != old_boot:
                return
            self._session().close()
            if time.monotonic() > deadline:
                raise GuestTimeout(f"{self.describe()}: did not reboot within {limit:.0f} s", self)
            time.sleep(0.5)

    def shutdown(self, timeout: float = 120) -> None:
        """Power off cleanly (ACPI) and wait until QEMU exits."""
        if self.machine is None:
            return
        if self._ssh is not None:
            self._ssh.close()
        self.machine.shutdown(timeout * self.timeout_scale)

    def wait_for_shutdown(self, timeout: float = 300) -> None:
        __tracebackhide__ = True
        assert self.machine is not None
        if not self.machine.wait_for_exit(timeout * self.timeout_scale):
            screen = self.screen_text()
            shown = f"; the screen shows:\n{screen}\n---" if screen else ""
            raise GuestTimeout(
                f"{self.describe()}: did not power off within "
                f"{timeout * self.timeout_scale:.0f} s{shown}; "
                f"last console lines:\n{tail(self.console.log_path, 20)}",
                self,
            )

    # -- installers: display, keys, disks -----------------------------------------

    def _start_vnc(self) -> None:
        """QEMU: set the VNC password (refused to all until then); both: learn the port."""
        assert self.machine is not None and self.workdir is not None
        self.machine.prepare_vnc((self.workdir / "vnc-password").read_text().strip())
        info = self.machine.qmp("query-vnc") or {}
        self.vnc = (str(info.get("host", "127.0.0.1")), int(info.get("service", 0)))
        self._run.progress(
            f"pytest-kvm: {self.describe()}: VNC on {self.vnc[0]}:{self.vnc[1]} "
            f"(display :{self.vnc[1] - 5900}), password in {self.vnc_password_file}"
        )

    @property
    def vnc_password_file(self) -> Path | None:
        """The private file holding this guest's VNC password (--kvm-vnc), else None."""
        if not self.config.vnc or self.workdir is None:
            return None
        return self.workdir / "vnc-password"

    @property
    def has_display(self) -> bool:
        """It has a graphics card: installers, display=True, --kvm-vnc."""
        return self.config.display or self.config.vnc

    def _need_display(self, what: str) -> Machine:
        if self.machine is None or not self.machine.is_running():
            raise GuestError(f"{self.describe()}: {what} needs a running guest", self)
        if not (self.config.display or self.config.vnc):
            raise GuestError(
                f"{self.describe()}: {what} needs a display: pass display=True to "
                "kvm_guest_factory or run with --kvm-vnc (installer guests have one)",
                self,
            )
        return self.machine

    def screenshot(self, path: str | os.PathLike[str] | None = None) -> Path:
        """A PNG of the guest's display, written to ``path`` (default: in the guest's
        directory, numbered) and returned."""
        machine = self._need_display("a screenshot")
        assert self.workdir is not None
        self._shots += 1
        dest = Path(path) if path is not None else self.workdir / f"screen-{self._shots:03d}.png"
        data = machine.screenshot()
        if not data.startswith(PNG_MAGIC):
            data = ppm_to_png(data)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        return dest

    def send_keys(self, *keys: str, delay: float = 0.05) -> None:
        """Press keys on the guest's keyboard, one chord per argument:
        ``send_keys("down", "down", "ret")``, ``send_keys("ctrl-alt-delete")``."""
        machine = self._need_display("send_keys")
        chords = [key_chord(key) for key in keys]
        for chord in chords:
            machine.qmp("send-key", keys=qmp_keys(chord))
            time.sleep(delay)

    def type_text(self, text: str, delay: float = 0.02) -> None:
        """Type ``text`` on the guest's keyboard (US layout; newline is Enter)."""
        machine = self._need_display("type_text")
        for chord in text_chords(text):
            machine.qmp("send-key", keys=qmp_keys(chord))
            time.sleep(delay)

    def screen_text(self) -> str:
        """The text on the screen while it is in VGA text mode (BIOS, boot loader, a
        console without a framebuffer driver); "" in a graphics mode or without a
        display. Read through the monitor: briefly borrows the VGA index register."""
        machine = self.machine
        if (
            machine is None
            or not machine.is_running()
            or not (self.config.display or self.config.vnc)
        ):
            return ""

        def hmp(line: str) -> str:
            return str(machine.qmp("human-monitor-command", **{"command-line": line}) or "")

        try:
            # A Linux console scrolls by moving the CRT controller's start address
            # through the 32 KiB text buffer: read it (registers 0x0c/0x0d) first.
            index = hmp("i /b 0x3d4").rsplit("=", 1)[-1].strip()
            start = 0
            for register in (0x0C, 0x0D):
                hmp(f"o /b 0x3d4 {register:#x}")
                start = (start << 8) | int(hmp("i /b 0x3d5").rsplit("=", 1)[-1].strip(), 16)
            hmp(f"o /b 0x3d4 {index}")
            address = VGA_TEXT_ADDRESS + min(2 * start, 0x8000 - VGA_TEXT_BYTES)
            out = hmp(f"xp /{VGA_TEXT_BYTES}xb {address:#x}")
        except (ConnectionError, QmpError, OSError, ValueError):
            return ""
        data = bytes(int(v, 16) for v in re.findall(r"\b0x([0-9a-f]{2})\b", out))
        return vga_text(data)

    @property
    def disk_image(self) -> Path:
        """This guest's own disk (a qcow2 in its directory; an installer's installed
        disk): what ``kvm_guest_factory(disk=...)`` boots. It goes with the guest."""
        if self._overlay is None or self._closed:
            raise GuestError(f"{self.describe()}: it has no disk (not started, or closed)", self)
        if self.machine is not None and self.machine.disk_is_remote:
            self._stopped("disk_image")
        return self._fetch_disk()

    def _stopped(self, what: str) -> None:
        if self.machine is not None and self.machine.is_running():
            raise GuestError(
                f"{self.describe()}: {what} needs it stopped; call wait_for_shutdown() "
                "or shutdown() first",
                self,
            )

    def boot_installed(self, **factory_args: Any) -> Guest:
        """Boot what an installer wrote: a new SSH-ready guest on an overlay of this
        guest's disk (this disk is not changed). Arguments go to kvm_guest_factory."""
        self._stopped("boot_installed()")
        if self.boot_disk is None:
            raise GuestError(
                f"{self.describe()}: boot_installed() needs a guest made by "
                "kvm_guest_factory; boot the disk with kvm_guest_factory(disk=...)",
                self,
            )
        return self.boot_disk(disk=self.disk_image, **factory_args)

    def save_image(self, path: str | os.PathLike[str]) -> Path:
        """Keep this guest's disk as a standalone qcow2 image at ``path`` (whole or not
        at all), for later tests: ``--kvm-image PATH`` or ``factory(image=PATH)``."""
        self._stopped("save_image()")
        if self.image.is_encrypted and not self.config.blank:
            raise KvmConfigError(
                f"{self.describe()}: save_image() of an encrypted guest is not supported"
            )
        dest = Path(path)
        if dest.is_dir():
            raise KvmConfigError(f"save_image({str(path)!r}): that is a directory")
        if not dest.parent.is_dir():
            raise KvmConfigError(f"save_image({str(path)!r}): {str(dest.parent)!r} does not exist")
        return flatten_image(self.disk_image, dest)

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
        if self._lease is not None:
            self._lease.update(kept=True)
        self._run.keep(self.name)
        with contextlib.suppress(Exception):
            if self._disk is not None:
                self._disk.close()
        if self._ssh is not None:
            self._ssh.close()
        if hasattr(self, "console"):
            self.console.close()
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

    def kill(self) -> None:
        """Pull the plug."""
        if self._ssh is not None:
            self._ssh.close()
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

    def __repr__(self) -> str:
        return f"<Guest {self.name} {self.image.name} port={self._port}>"
