"""A libvirt save image re-headed for a clone: the clone's XML in the header, the
QEMU stream after it untouched but for the MAC in slirp's section, the template's
devices kept."""

from __future__ import annotations

import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pytest_kvm.backends.libvirt import METADATA_NS
from pytest_kvm.backends.libvirt.saveimage import (
    HEADER_SIZE,
    SaveImageError,
    clone_xml,
    read_header,
    rewritten,
    saved_macs,
    slirp_mac_offsets,
)

SAVED = f"""<domain type='qemu'>
  <name>pytest-kvm-template</name>
  <uuid>5a3c29a6-34ee-4c3c-9d5c-0a5e1d6c1a2b</uuid>
  <genid>11111111-2222-3333-4444-555555555555</genid>
  <metadata><pytestkvm:owner xmlns:pytestkvm="{METADATA_NS}" run="old" test="t"/></metadata>
  <memory unit='KiB'>1048576</memory>
  <devices>
    <disk type='volume' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source pool='pytest-kvm' volume='pytest-kvm-template.0.qcow2' index='2'/>
      <backingStore type='file' index='3'><format type='qcow2'/><source file='/b'/></backingStore>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='volume' device='cdrom'>
      <source pool='pytest-kvm' volume='pytest-kvm-template.1.raw'/>
      <target dev='sdb' bus='sata'/>
    </disk>
    <interface type='user'><mac address='02:6b:76:00:00:01'/><model type='virtio'/></interface>
  </devices>
</domain>"""
STREAM = b"QEVM\x00\x00\x00\x03" + bytes(range(256)) * 8


def _save_image(path: Path, xml: str, cookie: bytes = b"<qemu-migration/>\0") -> Path:
    xml_bytes = xml.encode() + b"\0"
    data_len = len(xml_bytes) + len(cookie) + 65536
    words = (2, data_len, 1, 0, len(xml_bytes) if cookie else 0, *([0] * 14))
    head = struct.pack("<16s5I14I", b"LibvirtQemudSave", *words)
    body = xml_bytes + cookie
    path.write_bytes(head + body + b"\0" * (data_len - len(body)) + STREAM)
    return path


def test_a_clone_gets_its_name_uuid_labels_and_disks_and_keeps_the_stream(tmp_path):
    saved = _save_image(tmp_path / "state", SAVED)
    header = read_header(saved)
    assert header.xml == SAVED and header.cookie == b"<qemu-migration/>\0"
    xml = clone_xml(header.xml, "pytest-kvm-clone-1",
                    [("pytest-kvm", "c.0.qcow2"), ("pytest-kvm", "c.1.raw")],
                    (("run", "r1"), ("test", "a<b")), METADATA_NS)  # fmt: skip
    head = rewritten(header, xml)
    clone = tmp_path / "clone"
    clone.write_bytes(head + saved.read_bytes()[len(head) :])
    # What libvirt reads back: the clone's XML, the cookie, the stream where it was.
    again = read_header(clone)
    assert again.xml == xml and again.cookie == header.cookie
    assert again.data_len == header.data_len
    assert clone.read_bytes()[HEADER_SIZE + header.data_len :] == STREAM
    root = ET.fromstring(xml)
    assert root.findtext("name") == "pytest-kvm-clone-1"
    assert root.findtext("uuid") not in ("", "5a3c29a6-34ee-4c3c-9d5c-0a5e1d6c1a2b")
    assert not root.findtext("genid")  # libvirt makes a new one
    [owner] = root.findall(f"metadata/{{{METADATA_NS}}}owner")
    assert owner.attrib == {"run": "r1", "test": "a<b"}
    disk, cdrom = root.findall("devices/disk")
    assert disk.find("source").attrib == {"pool": "pytest-kvm", "volume": "c.0.qcow2"}
    assert disk.find("backingStore") is None  # found again from the clone's chain
    assert cdrom.find("source").get("volume") == "c.1.raw"
    # The MAC is the template's: QEMU's saved state holds it.
    assert root.find("devices/interface/mac").get("address") == "02:6b:76:00:00:01"
    assert saved_macs(xml) == ["02:6b:76:00:00:01"]


def test_what_cannot_be_a_clone_is_refused(tmp_path):
    header = read_header(_save_image(tmp_path / "state", SAVED, cookie=b""))
    assert header.cookie == b""
    with pytest.raises(SaveImageError, match="does not fit"):
        rewritten(header, "x" * (header.data_len + 1))
    with pytest.raises(SaveImageError, match="2 disks, the clone 1"):
        clone_xml(header.xml, "n", [("p", "v")], (), METADATA_NS)
    partial = tmp_path / "partial"
    partial.write_bytes(b"LibvirtQemudPart" + (tmp_path / "state").read_bytes()[16:])
    with pytest.raises(SaveImageError, match="not a complete"):
        read_header(partial)


def test_a_clone_gets_its_own_mac_in_its_xml():
    xml = clone_xml(SAVED, "n", [("p", "a"), ("p", "b")], (), METADATA_NS, mac="02:6b:76:0a:0b:0c")
    assert saved_macs(xml) == ["02:6b:76:0a:0b:0c"]


MAC = bytes.fromhex("026b76000001")


def _stream_with_sections(path: Path) -> Path:
    """A save image whose stream has the MAC in the guest's RAM (next to the string
    "slirp" as guest memory may hold it), in slirp's section and in virtio-net's."""

    def section(number: int, idstr: bytes, body: bytes) -> bytes:
        return bytes([4]) + number.to_bytes(4, "big") + bytes([len(idstr)]) + idstr + body

    ram = b"QEVM" + b"\x05slirp" + MAC + bytes(500) + MAC
    devices = (
        section(3, b"timer", bytes(16))
        + section(5, b"slirp", bytes(12) + b"\x00\x01" + MAC + bytes(40))
        + section(9, b"0000:00:03.0/virtio-net", MAC + bytes(8) + MAC)
    )
    path.write_bytes(b"HEAD" + ram + devices)
    return path


def test_the_mac_is_found_in_slirps_section_only(tmp_path):
    image = _stream_with_sections(tmp_path / "state")
    data = image.read_bytes()
    offsets = slirp_mac_offsets(image, "02:6b:76:00:00:01", start=4)
    assert len(offsets) == 1
    assert data.rfind(b"slirp", 0, offsets[0]) > data.index(b"timer")  # in the device part
    assert data[offsets[0] - 2 : offsets[0]] == b"\x00\x01"
    assert slirp_mac_offsets(image, "02:6b:76:00:00:02", start=4) == []
