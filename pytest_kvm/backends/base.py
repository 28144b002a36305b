"""What a backend must provide: a machine built from a MachineSpec."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import NetworkSpec


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


class Machine(abc.ABC):
    """A running guest as its backend sees it. ``start`` acts; ``close`` is idempotent."""

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
