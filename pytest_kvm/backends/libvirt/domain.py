"""The libvirt domain for a MachineSpec: where and as whom it runs (LibvirtTarget),
its XML, and what the backend cannot do yet (REFUSALS)."""

from __future__ import annotations

import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import GuestLaunchError
from ...share import SharedDir, share_slot, share_tag
from ..base import MachineSpec
from .connection import is_remote, load_libvirt
from .storage import DEFAULT_POOL

METADATA_NS = "https://github.com/pytest-kvm/pytest-kvm/ns/1"

USER_NETDEV = "hostnet0"  # libvirt's id for the first <interface>'s netdev

# What the libvirt backend cannot do yet, and the one message refusing each
# (``LibvirtBackend.refusal``; the machine and the domain XML raise them too).
REFUSALS = {
    "encrypted images": "encrypted images are not supported on the libvirt backend yet",
    "vlans and bridges": "vlans and bridges are not supported on the libvirt backend yet",
    "kernel_args": "kernel_args (direct kernel boot) is not supported on libvirt yet",
    "snapshots": "kvm_snapshot images are not supported on the libvirt backend yet",
    # libvirt keeps a domain's TPM state by its UUID and runs swtpm_setup/swtpm
    # itself; restoring a template's TPM into a clone's new UUID is not done yet.
    "tpm templates": "TPM guests boot for real on the libvirt backend (no TPM templates yet)",
    # Its domain XML is x86_64 q35 only (an aarch64 or riscv64 domain needs its own
    # machine, firmware and devices); the qemu backend runs them.
    "architectures": "the libvirt backend runs x86_64 guests only; use --kvm-backend "
    "qemu for aarch64 and riscv64",
    "uefi templates": "UEFI guests boot for real on the libvirt backend (restoring a "
    "template's UEFI variables is not supported there yet)",
}


@dataclass(frozen=True)
class LibvirtTarget:
    """Where and as whom a guest runs on libvirt."""

    uri: str
    pool: str = DEFAULT_POOL
    labels: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    lock_dir: Path = field(default_factory=lambda: Path(tempfile.gettempdir()) / "pytest-kvm-locks")
    # --kvm-accel as given: "auto" on a remote host trusts its domain capabilities.
    accel: str = "auto"


# About 80 lines on purpose: the domain XML element by element, in the order of
# libvirt's schema; split, the document would be harder to read against it.
def domain_xml(
    spec: MachineSpec,
    domain_name: str,
    domain_type: str,
    disks: list[tuple[str, str, str, str]],
    labels: tuple[tuple[str, str], ...] = (),
) -> str:
    """The transient domain for ``spec``. ``disks``: (pool, volume, format, device)."""
    ET.register_namespace("pytestkvm", METADATA_NS)
    root = ET.Element("domain", type=domain_type)
    ET.SubElement(root, "name").text = domain_name
    ET.SubElement(root, "genid")  # a new VM generation ID every start
    meta = ET.SubElement(root, "metadata")
    owner = ET.SubElement(meta, f"{{{METADATA_NS}}}owner")
    for key, value in labels:
        owner.set(key, value)
    ET.SubElement(root, "memory", unit="MiB").text = str(spec.memory)
    ET.SubElement(root, "vcpu").text = str(spec.cpus)
    os_el = ET.SubElement(root, "os")
    if spec.arch != "x86_64":
        raise GuestLaunchError(f"{spec.arch} guest: {REFUSALS['architectures']}")
    ET.SubElement(os_el, "type", arch="x86_64", machine="q35").text = "hvm"
    secure = _firmware(os_el, spec)
    if spec.kernel is not None:
        raise GuestLaunchError(REFUSALS["kernel_args"])
    ET.SubElement(os_el, "boot", dev="cdrom" if spec.boot == "cdrom" else "hd")
    features = ET.SubElement(root, "features")
    ET.SubElement(features, "acpi")
    if secure:
        ET.SubElement(features, "smm", state="on")
    # As the qemu backend's -cpu host / -cpu max and -smp N (one socket of N cores).
    # Its -accel tcg,thread=multi is QEMU's default for x86_64 guests on x86_64
    # hosts, which libvirt's plain -accel tcg gets: one TCG thread per vCPU.
    if domain_type == "kvm":
        cpu = ET.SubElement(root, "cpu", mode="host-passthrough")
    else:
        cpu = ET.SubElement(root, "cpu", mode="maximum", match="exact")
    ET.SubElement(cpu, "topology", sockets="1", dies="1", cores=str(spec.cpus), threads="1")
    ET.SubElement(root, "on_poweroff").text = "destroy"
    ET.SubElement(root, "on_reboot").text = "restart"
    ET.SubElement(root, "on_crash").text = "destroy"
    devices = ET.SubElement(root, "devices")
    for index, (pool, volume, fmt, device) in enumerate(disks):
        disk = ET.SubElement(devices, "disk", type="volume", device=device)
        driver = ET.SubElement(disk, "driver", name="qemu", type=fmt)
        ET.SubElement(disk, "source", pool=pool, volume=volume)
        if device == "disk":
            driver.set("cache", "unsafe")
            driver.set("discard", "unmap")
            ET.SubElement(disk, "target", dev=f"vd{chr(ord('a') + index)}", bus="virtio")
        else:
            ET.SubElement(disk, "target", dev=f"sd{chr(ord('a') + index)}", bus="sata")
            ET.SubElement(disk, "readonly")
    kind = spec.network.kind
    if kind == "user":
        nic = ET.SubElement(devices, "interface", type="user")
    elif kind == "libvirt":  # a libvirt network: NAT, DHCP by its dnsmasq
        nic = ET.SubElement(devices, "interface", type="network")
        ET.SubElement(nic, "source", network=spec.network.name)
    elif kind == "bridge":  # an existing bridge on the hypervisor's host
        nic = ET.SubElement(devices, "interface", type="bridge")
        ET.SubElement(nic, "source", bridge=spec.network.name)
    else:
        raise GuestLaunchError(f"network {spec.network} is not supported on libvirt")
    ET.SubElement(nic, "mac", address=spec.mac)
    ET.SubElement(nic, "model", type="virtio")
    serial = ET.SubElement(devices, "serial", type="pty")
    ET.SubElement(serial, "target", port="0")
    console = ET.SubElement(devices, "console", type="pty")
    ET.SubElement(console, "target", type="serial", port="0")
    channel = ET.SubElement(devices, "channel", type="unix")
    ET.SubElement(channel, "target", type="virtio", name="org.qemu.guest_agent.0")
    rng = ET.SubElement(devices, "rng", model="virtio")
    ET.SubElement(rng, "backend", model="random").text = "/dev/urandom"
    if spec.display or spec.vnc:
        video = ET.SubElement(devices, "video")
        ET.SubElement(video, "model", type="vga")
    if spec.vnc:
        # On the hypervisor's 127.0.0.1; libvirt sets the password over the monitor.
        password = (spec.workdir / "vnc-password").read_text().strip()
        graphics = ET.SubElement(
            devices, "graphics", type="vnc", autoport="yes", listen="127.0.0.1", passwd=password
        )
        ET.SubElement(graphics, "listen", type="address", address="127.0.0.1")
    if spec.tpm:  # libvirt runs swtpm (and swtpm_setup) for it
        tpm = ET.SubElement(devices, "tpm", model="tpm-crb")
        ET.SubElement(tpm, "backend", type="emulator", version="2.0")
    ET.SubElement(devices, "memballoon", model="none")
    add_filesystems(devices, spec.shares)
    return ET.tostring(root, encoding="unicode")


def add_filesystems(devices: ET.Element, shares: tuple[SharedDir, ...]) -> None:
    """A 9p ``<filesystem>`` per share, at the qemu backend's fixed slot on bus 0 (a
    restored clone's XML gets them too: see share.py). ``squash`` is QEMU's
    ``security_model=none``: QEMU runs as libvirt's QEMU user, which cannot chown
    what the guest creates (``passthrough`` would fail those writes)."""
    for index, share in enumerate(shares):
        fs = ET.SubElement(devices, "filesystem", type="mount", accessmode="squash")
        ET.SubElement(fs, "driver", type="path")
        ET.SubElement(fs, "source", dir=str(share.source))
        ET.SubElement(fs, "target", dir=share_tag(index))
        if not share.rw:
            ET.SubElement(fs, "readonly")
        ET.SubElement(fs, "address", type="pci", domain="0x0000", bus="0x00",
                      slot=f"{share_slot(index):#04x}", function="0x0")  # fmt: skip


def _firmware(os_el: ET.Element, spec: MachineSpec) -> bool:
    """UEFI by libvirt's firmware autoselection (it keeps each domain's variables
    in a copy of its own, made from the firmware's template); True: Secure Boot."""
    if spec.firmware is None:
        return False
    secure = spec.firmware.secure
    os_el.set("firmware", "efi")
    wanted = ET.SubElement(os_el, "firmware")
    ET.SubElement(wanted, "feature", enabled="yes" if secure else "no", name="secure-boot")
    if secure:
        ET.SubElement(wanted, "feature", enabled="yes", name="enrolled-keys")
        ET.SubElement(os_el, "loader", secure="yes")
    return secure


def host_domain_type(conn: Any, uri: str, accel: str) -> str | None:
    """The domain type the hypervisor's host decides: on a remote host with
    ``--kvm-accel auto`` (``accel``), what its domain capabilities offer; else None,
    our own accelerator's (kvm: ``kvm``, tcg: ``qemu``)."""
    if is_remote(uri) and accel == "auto":
        return remote_domain_type(conn)
    return None


def remote_domain_type(conn: Any) -> str:
    """``kvm`` if the hypervisor's host offers KVM for x86_64 q35 guests, else ``qemu``.

    Our own probe runs here, not there; pass --kvm-accel tcg for a host whose KVM
    cannot run standard guests (a PVM host, say)."""
    libvirt, _ = load_libvirt()
    try:
        conn.getDomainCapabilities(None, "x86_64", "q35", "kvm", 0)
    except libvirt.libvirtError:
        return "qemu"
    return "kvm"
