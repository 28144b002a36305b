"""How one guest is made (GuestConfig), its checks, and the one rule for "may this guest
be restored from a template"."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..backends import backend_class
from ..backends.base import Backend, Labels
from ..customize import check_hostname
from ..errors import KvmConfigError
from ..images import Image
from ..images.kernel import BootFiles
from ..media import check_install_media
from ..network import NetworkSpec
from ..share import SharedDir
from ..ssh import KeyPair
from ..vlan import Vlan

_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)
# An installer's empty disk: unless disk_size= says otherwise; never smaller than this.
DEFAULT_BLANK_DISK = 8 << 30
MIN_BLANK_DISK = 16 << 20


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
    # An emulated TPM 2.0 (swtpm); a template's clones get a copy of its TPM state.
    tpm: bool = False
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
    # --kvm-snapshot (default on): the factory may restore this guest from a booted
    # template when ``restore_refusal`` allows it; off, every guest boots for real.
    snapshot: bool = False
    # Host folders mounted in the guest (share.py); restored clones get them too.
    shares: tuple[SharedDir, ...] = ()
    # "bios", "uefi", "uefi-secure" or "u-boot" (firmware.py; "auto" is resolved before).
    firmware: str = "bios"
    # The guest's architecture, a ``uname -m`` name (arch.py): the image's own.
    arch: str = "x86_64"

    def __post_init__(self) -> None:
        # Checked here, before a template is made or anything starts.
        if self.hostname is not None:
            check_hostname(self.hostname)

    def restore_refusal(self) -> str:
        """ "" if a guest made like this may be restored from a template; else why it
        boots for real. The one rule: the factory asks it before it picks a template,
        and ``Guest`` refuses a template for a config it refuses."""
        if (
            self.cdrom is not None or self.boot != "disk" or not self.ssh
            or self.disk_size is not None or self.kernel_args or self.blank
            or self.kernel is not None or self.installed or self.display
        ):  # fmt: skip
            return (
                "cdrom, boot, ssh=False, disk_size, kernel, kernel_args, disk and display "
                "need a real boot"
            )
        if self.image.is_encrypted:
            return (
                f"image {self.image.name}: encrypted images boot for real (a template's "
                "saved RAM would hold the decrypted disk in the clear)"
            )
        # A bridge clone takes its own MAC and DHCP lease (identity.py).
        if self.network.kind not in ("user", "bridge"):
            return f"network {self.network}: guests boot for real (no template)"
        if self.network.kind == "bridge" and self.backend != "qemu":
            return f"network {self.network}: bridge templates are made on the qemu backend only"
        refused = backend_class(self.backend).refusal("templates")
        if not refused and self.tpm:
            refused = backend_class(self.backend).refusal("tpm templates")
        if not refused and self.firmware != "bios":
            refused = backend_class(self.backend).refusal("uefi templates")

        if refused:
            return refused
        return ""


@dataclass(frozen=True)
class BootPlan:
    """A booted guest whose disk, seed and RAM file go into ``dir`` and survive it,
    with the keys given here: how a template is made."""

    dir: Path
    client_key: KeyPair
    host_key: KeyPair


class ShapeFacts(Protocol):
    @property
    def display(self) -> bool:
        """The template's guest had a graphics card (clones must have it too)."""

    @property
    def tpm(self) -> bool:
        """The template's guest had a TPM (its state is in the saved state)."""


class SavedGuest(Protocol):
    """What a guest restored from a template reads of it. ``template.Template`` is
    one; a Protocol here, so that the guest layer does not import the template layer
    above it."""

    @property
    def name(self) -> str: ...
    @property
    def shape(self) -> ShapeFacts: ...
    @property
    def mac(self) -> str: ...
    @property
    def client_key(self) -> KeyPair: ...
    @property
    def host_key(self) -> KeyPair: ...
    @property
    def agent(self) -> bool: ...
    @property
    def sshd_holds_keys(self) -> bool | None: ...
    @property
    def vlan_macs(self) -> tuple[str, ...]: ...
    @property
    def disk(self) -> Path: ...
    @property
    def ram(self) -> Path: ...
    @property
    def state(self) -> Path: ...
    @property
    def seed(self) -> Path: ...
    @property
    def serial_log(self) -> Path: ...


def check_config(config: GuestConfig) -> None:
    """What a config must satisfy before anything starts (KvmConfigError if not)."""
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
    if config.shares and not config.ssh:
        raise KvmConfigError("share= is mounted in the guest over SSH: not with ssh=False")
    if config.kernel_args and config.boot_files is None:
        raise KvmConfigError("kernel_args needs the image's boot files (boot_files=)")


def template_refusal(config: GuestConfig, template: SavedGuest) -> str:
    """ "" if a guest of ``config`` may be restored from this template; else why it
    boots for real (what only the built template tells)."""
    if config.network.kind == "bridge" and not template.agent:
        return (
            f"network {config.network}: the template's qemu-ga did not answer, and a "
            "bridge clone is unreachable until it took its own MAC and DHCP lease (it "
            "holds the template's address until then, as every other clone does): only "
            "the guest agent reaches it before that, so it boots for real"
        )
    return ""


def check_template(config: GuestConfig, template: SavedGuest) -> None:
    """A guest restored from ``template``: the config may be restored, and is shaped
    like the template."""
    refusal = config.restore_refusal() or template_refusal(config, template)
    if refusal:
        raise KvmConfigError(refusal)
    if template.shape.display != (config.display or config.vnc):
        raise KvmConfigError("the template has no display (or one this guest does not)")
    if template.shape.tpm != config.tpm:
        raise KvmConfigError("the template has no TPM (or one this guest does not)")
    if len(template.vlan_macs) != len(config.vlans):
        raise KvmConfigError("the template has another number of vlan NICs")
