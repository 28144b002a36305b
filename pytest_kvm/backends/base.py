"""What a backend must provide: a per-run ``Backend`` that checks its setup, makes
a ``Machine`` from a ``MachineSpec`` and says what it cannot do yet."""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from ..config import NetworkSpec
from ..firmware import Firmware
from ..share import SharedDir

if TYPE_CHECKING:
    from ..config import Settings
    from ..qga import AgentCalls
    from ..ssh import SshJump


@dataclass(frozen=True)
class Drive:
    path: Path
    format: str = "qcow2"
    media: str = "disk"  # "disk" | "cdrom"
    readonly: bool = False
    # A LUKS-encrypted qcow2 chain: which layers are encrypted (top first) and the
    # private file QEMU reads their key from (a secret object, never argv).
    encrypted: tuple[bool, ...] = ()
    secret: Path | None = None


@dataclass(frozen=True)
class Nic:
    """A NIC beyond the primary one: its ``-netdev`` value (with ``id=``) and MAC."""

    netdev_id: str
    netdev: str
    mac: str


@dataclass(frozen=True)
class MachineSpec:
    """Everything a backend needs to start one guest; paths live in ``workdir``."""

    name: str
    workdir: Path
    drives: tuple[Drive, ...]
    memory: int
    cpus: int
    accel: str
    network: NetworkSpec
    mac: str
    ssh_port: int
    boot: str = "disk"  # "disk" | "cdrom"
    extra_args: tuple[str, ...] = field(default_factory=tuple)
    sockdir: Path | None = None  # UNIX sockets, if ``workdir`` is too long for them
    # Guest RAM in a file: shared (MAP_SHARED) for a template being made, private
    # copy-on-write for a clone restored from it.
    ram_file: Path | None = None
    ram_shared: bool = False
    # A saved migration stream to restore at start (the clone path).
    incoming: Path | None = None
    # Direct kernel boot (kernel_args): QEMU loads these instead of the firmware
    # booting the disk.
    kernel: Path | None = None
    initrd: Path | None = None
    append: str = ""
    # bridge: a tap device this process opened, inherited by QEMU.
    tap_fd: int | None = None
    nics: tuple[Nic, ...] = ()
    # A graphics card (std VGA) for screenshots and key presses; VNC on 127.0.0.1
    # (password-protected, set through QMP after start) to watch it live.
    display: bool = False
    vnc: bool = False
    # QEMU gets SIGKILL when the process that started it dies. Off only for guests
    # that may be kept after the run (--kvm-keep-on-failure); their leases let
    # `pytest-kvm reap` end them.
    die_with_parent: bool = True
    # Host folders as virtio-9p devices (tag ``share_tag(i)``, PCI slot ``share_slot(i)``).
    shares: tuple[SharedDir, ...] = ()
    # An emulated TPM 2.0. ``tpm_socket``: the control socket of the swtpm the guest
    # started for it (backends without ``Backend.runs_swtpm``: QEMU's own).
    tpm: bool = False
    tpm_socket: Path | None = None
    # firmware.py: OVMF/AAVMF (UEFI) and the guest's own copy of its variables, or
    # OpenSBI + U-Boot (riscv64); None: SeaBIOS (x86_64).
    firmware: Firmware | None = None
    efivars: Path | None = None
    # The guest's architecture (arch.py, ``uname -m`` names): its QEMU and machine.
    arch: str = "x86_64"

    @property
    def _sockets(self) -> Path:
        return self.sockdir or self.workdir

    @property
    def serial_log(self) -> Path:
        return self.workdir / "serial.log"

    @property
    def console_socket(self) -> Path:
        return self._sockets / "console.sock"

    @property
    def qmp_socket(self) -> Path:
        return self._sockets / "qmp.sock"

    @property
    def qga_socket(self) -> Path:
        return self._sockets / "qga.sock"

    @property
    def stderr_log(self) -> Path:
        return self.workdir / "qemu.log"


class QmpError(RuntimeError):
    """QEMU answered a QMP command with an error (an unknown command or argument, a
    device that refuses): what ``Machine.qmp`` raises on every backend. ``command``
    names the command, ``error_class`` is QEMU's class (``GenericError``, ...) and
    ``desc`` its description."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"{command}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


@runtime_checkable
class SavesState(Protocol):
    """Capability: the machine can write its device state for a template (RAM stays
    in its shared RAM file, or goes into ``path`` too where ``Backend.ram_in_file``
    is False) and a clone can be restored from it (``MachineSpec.incoming``, a local
    path: a backend running guests elsewhere brings it there). ``Guest`` asks
    ``machine.state_saver()``. The machine may stop as it saves (``is_running()``
    is then False); its disk (``spec.drives[0].path``) is as saved once this returns
    (a ``disk_is_remote`` backend brings it back)."""

    def save_state(self, path: Path, timeout: float = 120.0) -> None: ...


@runtime_checkable
class OutlivesRun(Protocol):
    """Capability: the machine can stay running after this process ends
    (``--kvm-keep-on-failure``): ``detach`` lets go of it without stopping it; ``pid``
    is the process a user (or the reaper) ends it by."""

    @property
    def pid(self) -> int | None: ...

    def detach(self) -> None: ...


class Machine(abc.ABC):
    """A running guest as its backend sees it. The constructor records; ``start``
    acts; ``close`` is idempotent and ends the guest (unless ``detach``ed).

    This is the whole contract ``Guest`` relies on: nothing outside ``backends/``
    tests which class a machine is. Optional abilities are the capability protocols
    above, asked for with ``state_saver()`` and ``keeper()``.
    """

    # Why a guest on this backend cannot be kept after the run ("" if it can).
    keep_refusal: str = ""
    # Why there are no QMP events to save in artifacts (None: ``events`` has them).
    events_note: str | None = None
    # The primary NIC's netdev id, for ``hostfwd_add`` and ``set_link``.
    primary_netdev: str = "net0"
    # The guest's disks live where the backend runs them, not in ``spec.workdir``:
    # ``fetch_disk`` copies the top overlay back, and only once the guest stopped.
    disk_is_remote: bool = False
    # SSH forwarding on user networking is added after ``start`` (``forward``)
    # instead of being part of the machine's configuration.
    forwards_ssh_after_start: bool = False
    # ``screenshot`` works without ``MachineSpec.display`` (QEMU's default VGA card).
    has_vga: bool = True

    def state_saver(self) -> SavesState | None:
        """This machine as a ``SavesState`` if it can save state, else None."""
        return self if isinstance(self, SavesState) else None

    def keeper(self) -> OutlivesRun | None:
        """This machine as an ``OutlivesRun`` if it can outlive the run, else None."""
        return self if isinstance(self, OutlivesRun) else None

    spec: MachineSpec

    @abc.abstractmethod
    def start(self) -> None: ...

    @abc.abstractmethod
    def is_running(self) -> bool: ...

    @abc.abstractmethod
    def exit_code(self) -> int | None: ...

    @abc.abstractmethod
    def qmp(self, command: str, **args: Any) -> Any:
        """Run a QMP command and return its ``return`` value.

        Raises ``QmpError`` when QEMU answers with an error (the same type on every
        backend, so callers can fall back to another form of a command),
        ``ConnectionError`` when the guest is not running or the monitor is gone,
        and ``TimeoutError`` when QEMU does not answer."""

    @abc.abstractmethod
    def wait_for_exit(self, timeout: float) -> bool: ...

    @abc.abstractmethod
    def shutdown(self, timeout: float = 30.0) -> None: ...

    @abc.abstractmethod
    def kill(self) -> None: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    @property
    @abc.abstractmethod
    def argv(self) -> list[str]: ...

    @property
    @abc.abstractmethod
    def events(self) -> list[dict[str, Any]]: ...

    @abc.abstractmethod
    def agent(self) -> AgentCalls:
        """A new, unconnected client of the guest's qemu-ga (``connect`` it, ``close``
        it); its ``execute`` raises ``GuestAgentError`` for agent errors."""

    @abc.abstractmethod
    def screenshot(self) -> bytes:
        """The guest's display as PNG or PPM bytes (callers convert PPM)."""

    def forward(self, host_port: int, guest_port: int) -> None:
        """TCP ``127.0.0.1:host_port`` on the host running the guest to ``guest_port``
        (user networking). Raises ``GuestLaunchError`` when QEMU refuses the rule."""
        from ..errors import GuestLaunchError

        rule = f"hostfwd_add {self.primary_netdev} tcp:127.0.0.1:{host_port}-:{guest_port}"
        out = str(self.qmp("human-monitor-command", **{"command-line": rule}) or "").strip()
        if out:
            raise GuestLaunchError(f"host forwarding rule 127.0.0.1:{host_port}: {out}")

    def prepare_vnc(self, password: str) -> None:
        """Make VNC usable with ``password`` once the machine runs (a backend that
        put the password into its configuration does nothing)."""
        self.qmp("set_password", protocol="vnc", password=password)

    def leased_address(self, mac: str) -> str:
        """The IPv4 address the backend's own DHCP server leased to ``mac``, or ""."""
        return ""

    def lease_fields(self) -> dict[str, object]:
        """What the run's lease must record before ``start`` so that the reaper can
        end this machine after a crash (process IDs come through ``on_spawn``)."""
        return {}

    def fetch_disk(self, dest: Path, backing: Path | None) -> None:
        """Bring the stopped guest's top overlay to ``dest`` (``disk_is_remote``
        backends); ``backing`` is what it is rebased on. Local disks: nothing."""
        return None

    def stats(self) -> dict[str, int]:
        """What the guest consumed so far (``cpu_time_ns``, ``peak_rss_kib``,
        ``disk_written_bytes``), or {} where the backend cannot tell."""
        return {}


# A guest's owner labels: (key, value) pairs a backend may record with the machine
# (libvirt: the domain's metadata) so that a reaper can tell whose it is.
Labels = tuple[tuple[str, str], ...]


class Backend(abc.ABC):
    """Who runs this run's guests: one per run (and process), made from its settings
    by ``backends.load_backend``. The constructor records; ``check`` acts (once per
    run, before any guest); ``machine`` makes each guest's ``Machine``; ``close`` is
    idempotent and lets go of whatever the backend holds for the run.

    ``refusals`` is the one place saying what a backend cannot do yet: a feature
    ("templates", "encrypted images", "vlans and bridges", "kernel_args") and the
    message to refuse it with; callers ask ``refusal(feature)``."""

    name: ClassVar[str]
    refusals: ClassVar[Mapping[str, str]] = {}
    # Templates: True, a template's guest RAM is a file of its own next to its saved
    # state (``MachineSpec.ram_file``, shared while the template runs, mapped private
    # by clones); False, the saved state (``SavesState.save_state``) holds the RAM
    # too, and machines ignore ``ram_file``.
    ram_in_file: ClassVar[bool] = True
    # True: a clone gets its own MAC: with ``ram_in_file``, by a private copy of the
    # saved device state with the template's MAC replaced (guest/clone.py); without,
    # the machine puts it in the copy of the saved state it restores from. False,
    # clones keep the template's MAC (the rest of their identity is still their own).
    clone_mac: ClassVar[bool] = True
    # True: the backend starts a TPM guest's swtpm itself (libvirt); False, the guest
    # starts one (tpm.py) and passes its socket as ``MachineSpec.tpm_socket``.
    runs_swtpm: ClassVar[bool] = False

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings

    @classmethod
    def refusal(cls, feature: str) -> str:
        """ "" if this backend can do ``feature``, else the message refusing it."""
        return cls.refusals.get(feature, "")

    def check(self) -> None:
        """Fail the run now (KvmConfigError) if its settings cannot work here."""
        return None

    @abc.abstractmethod
    def machine(
        self,
        spec: MachineSpec,
        *,
        on_spawn: Callable[[int], None] | None = None,
        labels: Labels = (),
    ) -> Machine:
        """A new, unstarted machine for ``spec``. ``on_spawn(pid)`` is called with the
        process that runs it as soon as it exists (if this host runs it); ``labels``
        name the guest's owner where the backend records them."""

    @property
    def uri(self) -> str:
        """Where guests run, for their leases ("" for this host's QEMU)."""
        return ""

    def template_identity(self) -> dict[str, object]:
        """What a template saved on this backend depends on beyond the image, shape,
        accelerator and this host's QEMU: it goes into the template key ({}: nothing,
        the key stays what it was before backends had a say). A backend whose saved
        state is another format or lives on another host says so here."""
        return {}

    def jump(self) -> SshJump | None:
        """The SSH connection guests' forwards are reached through (their host is
        another), or None when they are on our own 127.0.0.1."""
        return None

    @classmethod
    def reap(cls, lease: Mapping[str, Any]) -> list[str]:
        """End what a dead run's guest lease names that only this backend knows how
        to end (processes, taps and dirs the reaper ends itself); what was done."""
        return []

    def close(self) -> None:
        """Let go of the run's connections; idempotent."""
        return None
