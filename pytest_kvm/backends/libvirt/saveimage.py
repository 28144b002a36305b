"""libvirt's save image (what ``virDomainSave`` writes), read and re-headed for a clone.

The file is a header, the domain XML and libvirt's cookie in a ``data_len`` area
padded with zeros (libvirt leaves 64 KiB of room there for edits), then QEMU's
migration stream. A clone is restored from a copy of the template's file whose XML
names the clone: ``virDomainRestoreFlags`` with an XML of another name or UUID is
refused by libvirt's ABI check ("Target domain name ... does not match source"),
so the XML is changed in the file itself and the restore is given none.

Layout (libvirt's ``virQEMUSaveHeader``, little-endian on x86_64): magic (16
bytes), version, data_len, was_running, compressed (format), cookieOffset, 14
unused words; then ``data_len`` bytes: XML and NUL, cookie and NUL, zeros.
"""

from __future__ import annotations

import mmap
import struct
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from ...share import SharedDir
from .domain import add_filesystems

MAGIC = b"LibvirtQemudSave"
_HEADER = struct.Struct("<16s5I14I")
HEADER_SIZE = _HEADER.size  # 92


class SaveImageError(ValueError):
    """Not a complete, uncompressed libvirt save image we can re-head."""


@dataclass(frozen=True)
class SaveHeader:
    """A save image's header and its XML and cookie."""

    fields: tuple[int, ...]  # the header's words after the magic
    xml: str
    cookie: bytes  # with its NUL, or b""

    @property
    def data_len(self) -> int:
        return self.fields[1]

    @property
    def size(self) -> int:
        """Bytes before QEMU's stream: what a clone's copy gets rewritten."""
        return HEADER_SIZE + self.data_len


def read_header(path: Path) -> SaveHeader:
    with path.open("rb") as src:
        raw = src.read(HEADER_SIZE)
        if len(raw) != HEADER_SIZE:
            raise SaveImageError(f"{path}: too short for a libvirt save image")
        magic, *fields = _HEADER.unpack(raw)
        if magic != MAGIC:
            raise SaveImageError(f"{path}: not a complete libvirt save image ({magic!r})")
        version, data_len, _running, compressed, cookie_offset = fields[:5]
        if version != 2 or compressed != 0:
            raise SaveImageError(f"{path}: save image version {version}, format {compressed}")
        data = src.read(data_len)
    if len(data) != data_len:
        raise SaveImageError(f"{path}: its XML is cut short")
    xml_len = cookie_offset or data_len
    xml = data[:xml_len].split(b"\0", 1)[0].decode()
    cookie = data[xml_len:].split(b"\0", 1)[0] + b"\0" if cookie_offset else b""
    return SaveHeader(tuple(fields), xml, cookie)


def rewritten(header: SaveHeader, xml: str) -> bytes:
    """The first ``header.size`` bytes of a copy whose domain XML is ``xml``."""
    xml_bytes = xml.encode() + b"\0"
    body = xml_bytes + header.cookie
    if len(body) > header.data_len:
        raise SaveImageError(
            f"the clone's domain XML ({len(body)} bytes) does not fit the save image's "
            f"{header.data_len} bytes"
        )
    fields = list(header.fields)
    if header.cookie:
        fields[4] = len(xml_bytes)
    out = _HEADER.pack(MAGIC, *fields) + body + b"\0" * (header.data_len - len(body))
    assert len(out) == header.size
    return out


def clone_xml(
    saved: str,
    name: str,
    volumes: list[tuple[str, str]],
    labels: tuple[tuple[str, str], ...],
    metadata_ns: str,
    vnc_password: str | None = None,
    mac: str | None = None,
    shares: tuple[SharedDir, ...] = (),
) -> str:
    """The template's saved domain XML made the clone's: its name, a new UUID and VM
    generation ID, its owner labels, its disks' (pool, volume) in order (their backing
    chains are found again), its VNC password and its first NIC's ``mac``. Devices
    and addresses stay the template's: they are what QEMU's saved state was made
    with; ``shares`` are added (9p devices the saved state knows nothing of: the guest
    finds them with a PCI rescan, see share.py)."""
    ET.register_namespace("pytestkvm", metadata_ns)
    root = ET.fromstring(saved)  # noqa: S314 (libvirtd's own XML, from our own template)
    _child(root, "name").text = name
    _child(root, "uuid").text = str(uuid.uuid4())
    genid = root.find("genid")
    if genid is not None:
        genid.text = None  # libvirt makes a new one
    meta = root.find("metadata")
    if meta is None:
        meta = ET.SubElement(root, "metadata")
    for old in meta.findall(f"{{{metadata_ns}}}owner"):
        meta.remove(old)
    owner = ET.SubElement(meta, f"{{{metadata_ns}}}owner")
    for key, value in labels:
        owner.set(key, value)
    disks = [d for d in root.findall("devices/disk") if d.find("source") is not None]
    if len(disks) != len(volumes):
        raise SaveImageError(f"the template has {len(disks)} disks, the clone {len(volumes)}")
    for disk, (pool, volume) in zip(disks, volumes, strict=True):
        for store in disk.findall("backingStore"):
            disk.remove(store)
        source = _child(disk, "source")
        source.attrib.clear()
        source.set("pool", pool)
        source.set("volume", volume)
    for graphics in root.findall("devices/graphics"):
        if vnc_password is not None:
            graphics.set("passwd", vnc_password)
    if mac is not None:
        nic = root.find("devices/interface/mac")
        if nic is None:
            raise SaveImageError("the saved domain XML has no NIC to give the clone's MAC")
        nic.set("address", mac)
    if shares:
        add_filesystems(_child(root, "devices"), shares)
    return ET.tostring(root, encoding="unicode")


# QEMU's migration stream: a device's section starts QEMU_VM_SECTION_FULL (4), its
# section id (4 bytes), the length of its id string (1 byte) and the id string.
_SECTION_FULL = 4
_SLIRP = b"\x05slirp"
# Section id strings that can hold a NIC's MAC (where slirp's section ends).
_OTHER_IDS = (b"virtio-net", b"e1000", b"rtl8139")


def slirp_mac_offsets(path: Path, mac: str, start: int = 0) -> list[int]:
    """Where, in the save image at ``path``, user networking's saved DHCP table
    (slirp's section: device state comes after the RAM) holds ``mac``: the bytes a
    clone's copy gets its own MAC at. The guest's RAM and its NIC's state are left
    alone (the guest takes the new MAC itself, as on the qemu backend)."""
    raw = bytes(int(part, 16) for part in mac.split(":"))
    with path.open("rb") as src, mmap.mmap(src.fileno(), 0, access=mmap.ACCESS_READ) as data:
        at = data.rfind(_SLIRP)
        while at >= start and data[at - 5] != _SECTION_FULL:
            at = data.rfind(_SLIRP, start, at)  # the id string in the guest's RAM
        if at < start:
            return []
        ends = [data.find(other, at) for other in _OTHER_IDS]
        end = min([e for e in ends if e >= 0], default=len(data))
        offsets, hit = [], data.find(raw, at, end)
        while hit >= 0:
            offsets.append(hit)
            hit = data.find(raw, hit + 1, end)
    return offsets


def saved_macs(saved: str) -> list[str]:
    """The MACs of the saved domain's NICs, in order."""
    root = ET.fromstring(saved)  # noqa: S314 (libvirtd's own XML, from our own template)
    return [str(mac.get("address", "")).lower() for mac in root.findall("devices/interface/mac")]


def _child(parent: ET.Element, tag: str) -> ET.Element:
    found = parent.find(tag)
    if found is None:
        raise SaveImageError(f"the saved domain XML has no <{tag}>")
    return found
