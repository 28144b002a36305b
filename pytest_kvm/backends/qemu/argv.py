"""The QEMU command line for a MachineSpec: pure, unit-tested without QEMU."""

from __future__ import annotations

from ... import arch as arches
from ...errors import GuestLaunchError
from ...firmware import UBoot
from ...images.overlay import key_secret_opts, secret_object
from ...network import netdev_args
from ...share import share_slot, share_tag
from ...tpm import qemu_tpm_args
from ..base import MachineSpec

QEMU_BINARY = "qemu-system-x86_64"


# About 80 lines on purpose: one flat list of QEMU options in the order QEMU reads
# them, each a line or two; split, the order would be harder to check against argv.
def build_argv(spec: MachineSpec, binary: str | None = None) -> list[str]:
    """The QEMU command line for ``spec`` (pure: unit-tested without QEMU); ``binary``
    defaults to the QEMU of the spec's architecture."""
    arch = arches.get(spec.arch)
    x86 = arch.name == "x86_64"
    if spec.accel == "kvm" and not arch.is_host():
        raise GuestLaunchError(f"a {arch.name} guest cannot run under KVM on this host")
    accel = "kvm" if spec.accel == "kvm" else "tcg,thread=multi"
    argv = [
        binary or arch.qemu,
        "-name", f"guest={spec.name},debug-threads=on",
        "-machine", arch.machine,
        "-accel", accel,
        "-cpu", "host" if spec.accel == "kvm" else arch.tcg_cpu,
        "-m", str(spec.memory),
        "-smp", str(spec.cpus),
        "-nodefaults", "-no-user-config",
        "-display", "none",
        "-chardev", f"socket,id=qmp,path={spec.qmp_socket}",
        "-mon", "chardev=qmp,mode=control",
        "-chardev",
        f"socket,id=ser0,path={spec.console_socket},server=on,wait=off,"
        f"logfile={spec.serial_log},logappend=on",
        "-serial", "chardev:ser0",
        "-device", "virtio-rng-pci",
    ]  # fmt: skip
    if x86:
        # A new generation ID on every start, restored clones included: the guest
        # kernel reseeds its random pool when it changes (an ACPI device QEMU has
        # for x86 only; other guests reseed from virtio-rng alone).
        argv += ["-device", "vmgenid,guid=auto"]
    else:
        # Install media as SCSI CDs (the seed is a virtio disk): virt machines have no IDE.
        argv += ["-device", "virtio-scsi-pci,id=scsi0"]
    argv += [
        "-device", "virtio-serial-pci,id=vser0",
        "-chardev", f"socket,id=qga0,path={spec.qga_socket},server=on,wait=off",
        "-device", "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0",
    ]  # fmt: skip
    secrets = {drive.secret for drive in spec.drives if drive.secret is not None}
    if len(secrets) > 1:
        raise GuestLaunchError("drives encrypted with different secrets are not supported")
    for secret in secrets:
        argv += ["-object", secret_object(secret)]
    for index, drive in enumerate(spec.drives):
        _check_path_for_qemu(str(drive.path))
        opts = f"file={drive.path},format={drive.format},if=none,id=drive{index}"
        if drive.secret is not None and any(drive.encrypted):
            opts += "," + key_secret_opts(drive.encrypted)
        if drive.media == "cdrom":
            argv += ["-drive", opts + ",media=cdrom,readonly=on"]
            # OVMF ignores -boot order=d: the install CD's bootindex is what it reads
            # (the first CD: a seed ISO after it is not bootable).
            first_cd = next(d for d in spec.drives if d.media == "cdrom") is drive
            bootindex = ",bootindex=0" if spec.boot == "cdrom" and first_cd else ""
            if x86:
                argv += ["-device", f"ide-cd,drive=drive{index},bus=ide.{index}{bootindex}"]
            else:
                argv += ["-device", f"scsi-cd,drive=drive{index},bus=scsi0.0{bootindex}"]
            continue
        if drive.readonly:
            opts += ",readonly=on"
        else:
            opts += ",cache=unsafe,discard=unmap"
        argv += ["-drive", opts]
        bootindex = ",bootindex=1" if index == 0 and spec.boot == "disk" else ""
        argv += ["-device", f"virtio-blk-pci,drive=drive{index}{bootindex}"]
    # Every guest has a graphics card, so a failed test's artifacts hold a screenshot
    # (QEMU's screendump needs one). No cost to clones, measured: it adds ~0.2 MB to a
    # template's saved state; display=True only says what tests may use.
    argv += ["-device", "VGA"]
    if spec.vnc:
        # The first free display from :0 up; nobody gets in before set_password.
        argv += ["-vnc", "127.0.0.1:0,to=99,password=on"]
    if spec.boot == "cdrom":
        argv += ["-boot", "order=d"]
    if spec.kernel is not None:
        argv += ["-kernel", str(spec.kernel), "-append", spec.append]
        if spec.initrd is not None:
            argv += ["-initrd", str(spec.initrd)]
    argv += netdev_args(spec.network, netdev_id="net0", ssh_port=spec.ssh_port, tap_fd=spec.tap_fd)
    argv += ["-device", f"virtio-net-pci,netdev=net0,mac={spec.mac}"]
    for nic in spec.nics:
        argv += ["-netdev", nic.netdev]
        argv += ["-device", f"virtio-net-pci,netdev={nic.netdev_id},mac={nic.mac}"]
    if spec.tpm:
        if not x86:
            raise GuestLaunchError(f"a TPM is emulated for x86_64 guests only, not {arch.name}")
        if spec.tpm_socket is None:
            raise GuestLaunchError("a TPM guest needs its swtpm's socket (tpm_socket)")
        argv += qemu_tpm_args(spec.tpm_socket)
    if spec.ram_file is not None:
        _check_path_for_qemu(str(spec.ram_file))
        share = "on" if spec.ram_shared else "off"
        argv += [
            "-object",
            f"memory-backend-file,id=ram0,size={spec.memory}M,mem-path={spec.ram_file},"
            f"share={share}",
            "-machine", "memory-backend=ram0",
        ]  # fmt: skip
    argv += share_args(spec)
    if isinstance(spec.firmware, UBoot):
        argv += spec.firmware.qemu_args(None, direct_kernel=spec.kernel is not None)
    elif spec.firmware is not None and spec.efivars is not None:
        _check_path_for_qemu(str(spec.efivars))
        argv += spec.firmware.qemu_args(spec.efivars)
    elif not x86:
        raise GuestLaunchError(f"a {arch.name} guest needs its firmware (firmware.py)")
    if spec.incoming is not None:
        # The state comes through QMP once the x-ignore-shared capability is set
        # (QEMU 7.2 has no command-line property for it); no -S, so the guest
        # resumes by itself once the state is loaded.
        argv += ["-incoming", "defer"]
    argv += list(spec.extra_args)
    return argv


def share_args(spec: MachineSpec) -> list[str]:
    """A ``-fsdev`` and a ``virtio-9p-pci`` at a fixed slot per shared folder. A
    restored clone has them too, unknown to its saved state: they come up reset, and
    the guest finds them with a PCI rescan (see share.py)."""
    argv: list[str] = []
    for index, share in enumerate(spec.shares):
        _check_path_for_qemu(str(share.source))
        readonly = "" if share.rw else ",readonly=on"
        argv += [
            "-fsdev", f"local,id=fsdev{index},path={share.source},security_model=none{readonly}",
            "-device", f"virtio-9p-pci,id=share{index},fsdev=fsdev{index},"
            f"mount_tag={share_tag(index)},bus=pcie.0,addr={share_slot(index):#x}",
        ]  # fmt: skip
    return argv


def _check_path_for_qemu(path: str) -> None:
    # QEMU's option syntax splits on ',' ('' escapes it); refuse rather than misparse.
    if "," in path:
        raise GuestLaunchError(f"path {path!r} contains a comma, which QEMU options cannot carry")
