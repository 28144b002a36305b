"""From drives to a running machine, for a real boot and a restore alike: the
MachineSpec, the backend's machine, the lease fields a reaper needs, the SSH forward
and the VNC display."""

from __future__ import annotations

from pathlib import Path

from .. import arch as arches
from .. import firmware
from ..backends.base import Backend, Drive, Machine, MachineSpec
from ..errors import GuestLaunchError
from ..images.kernel import BootFiles
from ..network import free_port
from ..run import RunContext
from ..tpm import Swtpm
from ..util import process_start
from .config import GuestConfig
from .nics import Nics
from .screen import Screen
from .state import GuestState


class Launcher:
    """Starts the machine of one guest into ``state.machine``."""

    def __init__(
        self,
        run: RunContext,
        config: GuestConfig,
        runner: Backend,
        state: GuestState,
        nics: Nics,
        screen: Screen,
    ) -> None:
        self._run = run
        self._config = config
        self._runner = runner
        self._state = state
        self._nics = nics
        self._screen = screen
        self._firmware: firmware.Firmware | None = None
        self._efivars: Path | None = None

    def launch(
        self,
        drives: tuple[Drive, ...],
        ram_file: Path | None = None,
        ram_shared: bool = False,
        incoming: Path | None = None,
        boot_files: BootFiles | None = None,
        efivars: Path | None = None,
        efivars_from: Path | None = None,
    ) -> None:
        """``efivars``: where a UEFI guest's variables go (default: its directory),
        copied from ``efivars_from`` (a template's) or OVMF's template once."""
        self._efivars = self._firmware_vars(efivars, efivars_from)
        self._start_tpm()
        tap = self._nics.tap
        tap_fd = tap.open() if tap is not None else None
        try:
            self._launch_qemu(drives, ram_file, ram_shared, incoming, boot_files, tap_fd)
        finally:
            if tap is not None:
                tap.close()  # QEMU holds the tap now; it goes when QEMU exits

    def _firmware_vars(self, efivars: Path | None, source: Path | None) -> Path | None:
        if self._config.firmware == firmware.DEFAULT:
            return None
        if self._config.firmware == "u-boot":
            self._firmware = firmware.UBoot.find()
            return None  # nothing of the guest's own
        assert self._state.workdir is not None
        ovmf = firmware.Ovmf.find(self._config.firmware, arch=self._config.arch)
        self._firmware = ovmf
        efivars = efivars or self._state.workdir / firmware.VARS_NAME
        if not efivars.exists():
            ovmf.copy_vars(efivars, source)
        return efivars

    def _launch_qemu(
        self,
        drives: tuple[Drive, ...],
        ram_file: Path | None,
        ram_shared: bool,
        incoming: Path | None,
        boot_files: BootFiles | None,
        tap_fd: int | None,
    ) -> None:
        state, config = self._state, self._config
        assert state.workdir is not None
        user = self._nics.user
        self._screen.write_password()
        for attempt in range(5 if user else 1):
            state.port = free_port() if user else 22
            spec = MachineSpec(
                name=state.name,
                workdir=state.workdir,
                drives=drives,
                memory=config.memory,
                cpus=config.cpus,
                # Another architecture than the host's runs under TCG whatever KVM can do.
                accel=self._run.accel.name if arches.get(config.arch).is_host() else "tcg",
                network=self._nics.network,
                mac=state.mac,
                ssh_port=state.port,
                boot=config.boot,
                sockdir=state.sockdir,
                ram_file=ram_file,
                ram_shared=ram_shared,
                incoming=incoming,
                kernel=boot_files.kernel if boot_files else None,
                initrd=boot_files.initrd if boot_files else None,
                append=f"{boot_files.cmdline} {config.kernel_args}".strip() if boot_files else "",
                tap_fd=tap_fd,
                nics=self._nics.nics,
                display=config.display or config.vnc,
                vnc=config.vnc,
                die_with_parent=not config.keepable,
                shares=config.shares,
                tpm=config.tpm,
                tpm_socket=state.tpm.socket if state.tpm is not None else None,
                firmware=self._firmware,
                efivars=self._efivars,
                arch=config.arch,
            )
            machine = self._runner.machine(spec, on_spawn=self._record_qemu, labels=config.labels)
            state.record(**machine.lease_fields())  # before it exists
            try:
                state.machine = machine  # closed with the guest, also if start fails
                machine.start()
                if user and machine.forwards_ssh_after_start:
                    self._forward_ssh(machine)
            except GuestLaunchError as exc:
                exc.guest = state.name
                # Another process took the port between our check and QEMU's bind.
                if "host forwarding rule" in str(exc) and attempt < 4:
                    continue
                raise
            if self._nics.tap is not None:
                state.record(tap=self._nics.tap.ifname)
            self._screen.start_vnc(machine)
            return

    def _start_tpm(self) -> None:
        """The guest's swtpm (tpm=True), unless its backend runs one itself: a fresh
        state dir (0700) in the guest's workdir, restored clones included (their TPM
        state comes in the saved state), recorded in the lease as soon as it runs."""
        state, config = self._state, self._config
        if not config.tpm or self._runner.runs_swtpm or state.tpm is not None:
            return
        assert state.workdir is not None and state.sockdir is not None
        state.tpm = Swtpm(
            state.workdir / "tpm",
            state.sockdir / "tpm.sock",
            state.workdir / "swtpm.log",
            die_with_parent=not config.keepable,  # a kept guest keeps its TPM
        )
        state.tpm.start(30 * state.timeout_scale, on_spawn=self._record_tpm)

    def _record_tpm(self, pid: int) -> None:
        self._state.record(tpm_pid=pid, tpm_start=process_start(pid))

    def _record_qemu(self, pid: int) -> None:
        # Called right after QEMU is spawned, before start() waits for it: a kept
        # guest's QEMU has no parent-death signal, so a SIGKILL of this process from
        # here on would leave it running with nobody else knowing its PID.
        self._state.record(qemu_pid=pid, qemu_start=process_start(pid))

    def _forward_ssh(self, machine: Machine) -> None:
        """SSH on 127.0.0.1 of the libvirt host, added once the domain runs."""
        for attempt in range(5):
            try:
                machine.forward(self._state.port, 22)
                return
            except GuestLaunchError:
                if attempt == 4:
                    raise
                self._state.port = free_port()  # taken since we looked
