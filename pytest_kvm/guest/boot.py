"""A real boot: the guest's disk (an overlay of the image, or an installer's blank
disk), access written into an image without cloud-init, the seed, install media
or a kernel, power-on, the DHCP address and SSH."""

from __future__ import annotations

import time
from pathlib import Path

from ..backends.base import Drive
from ..customize import Access
from ..errors import KvmConfigError
from ..firmware import VARS_NAME
from ..images.kernel import BootFiles
from ..images.overlay import create_blank_disk, create_overlay
from ..seed import SeedConfig, write_seed
from ..ssh import KeyPair
from .commands import Commands
from .config import DEFAULT_BLANK_DISK, BootPlan, GuestConfig, parse_size
from .connection import Connection
from .disk import Disk
from .launch import Launcher
from .nics import Nics
from .state import GuestState


def seed_hostname(config: GuestConfig, name: str) -> str | None:
    """The host name the guest is given: hostname=, else its name; an installed
    disk keeps the one its installer set."""
    if config.hostname:
        return config.hostname
    return None if config.installed else name[:63]


def _disk_size(config: GuestConfig, what: str) -> int | None:
    size = parse_size(config.disk_size)
    if size is not None and size < config.image.virtual_size:
        raise KvmConfigError(
            f"{what}: disk_size {size} bytes is smaller than the image "
            f"({config.image.virtual_size} bytes)"
        )
    return size


class RealBoot:
    """Power on from the disk (or CD-ROM) and wait for SSH; ``plan``: a template's
    boot, whose files go into ``plan.dir`` with the plan's keys."""

    def __init__(
        self,
        config: GuestConfig,
        state: GuestState,
        plan: BootPlan | None,
        client_key: KeyPair,
        parts: tuple[Disk, Nics, Launcher, Connection, Commands],
    ) -> None:
        self._config = config
        self._state = state
        self._plan = plan
        self._client_key = client_key
        self._disk, self._nics, self._launcher, self._connection, self._commands = parts

    def start(self) -> None:
        state, config, plan = self._state, self._config, self._plan
        assert state.workdir is not None
        where = plan.dir if plan else state.workdir
        drives = self._drives(where)
        if config.cdrom is not None:
            drives.append(Drive(Path(config.cdrom).resolve(), "raw", media="cdrom"))
        boot_files = config.boot_files if config.kernel_args else None
        if config.kernel is not None:
            boot_files = BootFiles(config.kernel, config.initrd, config.append)
        t2 = time.monotonic()
        self._launcher.launch(
            tuple(drives),
            ram_file=plan.dir / "ram" if plan else None,
            ram_shared=True,
            boot_files=boot_files,
            efivars=where / VARS_NAME,
        )
        state.boot_timings["qemu_start"] = time.monotonic() - t2
        self._wait(t2)

    def _drives(self, where: Path) -> list[Drive]:
        """The overlay (access injected if it needs it) and the seed."""
        state, config, timings = self._state, self._config, self._state.boot_timings
        image = config.image
        t0 = time.monotonic()
        if config.blank:
            overlay = create_blank_disk(
                where / "disk.qcow2", parse_size(config.disk_size) or DEFAULT_BLANK_DISK
            )
        else:
            overlay = create_overlay(
                image.path, image.format, where / "disk.qcow2",
                size=_disk_size(config, state.what)
                or (image.virtual_size if image.is_encrypted else None),
                secret=image.secret if image.is_encrypted else None,
            )  # fmt: skip
        self._disk.overlay = overlay
        timings["overlay"] = time.monotonic() - t0
        t1 = time.monotonic()
        host_key = self._plan.host_key if self._plan else KeyPair.generate(f"host-{state.name}")
        self._connection.host_key = host_key
        hostname = seed_hostname(config, state.name)
        if not image.cloud_init and config.ssh and not config.blank:
            access = Access(
                user=config.user,
                authorized_key=self._client_key.public_openssh,
                host_key_private=host_key.private_openssh,
                host_key_public=host_key.public_openssh,
                hostname=hostname,
            )
            self._disk.inject_access(overlay, access)
            timings["inject"] = time.monotonic() - t1
            t1 = time.monotonic()
        drives = [Drive(overlay, "qcow2", **self._disk.keys())]
        if config.ssh or not config.blank:
            # An installer on a blank disk gets no seed: nothing would read it, and
            # it would be one more disk in the installer's list.
            seed = write_seed(
                SeedConfig(
                    instance_id=state.name,
                    hostname=hostname,
                    authorized_key=self._client_key.public_openssh,
                    host_key_private=host_key.private_openssh,
                    host_key_public=host_key.public_openssh,
                ),
                where / "seed.iso",
            )
            drives.append(Drive(seed, "raw", readonly=True))
            timings["seed"] = time.monotonic() - t1
        return drives

    def _wait(self, powered_on: float) -> None:
        """The DHCP address (bridge), SSH, and a bridge guest's settled network."""
        state, config, timings = self._state, self._config, self._state.boot_timings
        boot_timeout = config.boot_timeout * state.timeout_scale
        deadline = time.monotonic() + boot_timeout
        bridged = self._nics.network.kind != "user" and config.ssh
        if bridged:
            t3 = time.monotonic()
            state.address = self._nics.learn_address(deadline, boot_timeout)
            timings["address"] = time.monotonic() - t3
        if config.ssh:
            t3 = time.monotonic()
            self._connection.connect(deadline, progress_since=powered_on)
            timings["ssh_ready"] = time.monotonic() - t3
        if bridged:
            t4 = time.monotonic()

            def reconnect() -> None:
                self._connection.current().close()
                self._connection.connect(deadline)

            self._nics.settle_bridge(deadline, self._commands.run, reconnect)
            timings["settle"] = time.monotonic() - t4
