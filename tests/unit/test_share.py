"""share.py: share= checked (factory and marker), merged, its QEMU arguments and the
guest's mount script."""

from __future__ import annotations

import shlex
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pytest_kvm.backends.libvirt import METADATA_NS, domain_xml
from pytest_kvm.backends.libvirt.saveimage import clone_xml
from pytest_kvm.backends.qemu import build_argv
from pytest_kvm.config import Settings
from pytest_kvm.errors import KvmConfigError
from pytest_kvm.guest import GuestConfig
from pytest_kvm.guest.config import check_config
from pytest_kvm.images import Image
from pytest_kvm.request import GuestRequest
from pytest_kvm.share import MAX_SHARES, Share, SharedDir, merge_shares, mount_script, parse_shares
from tests.support.specs import LIBVIRT_DISKS as DISKS
from tests.support.specs import libvirt_spec, opt, spec

WHERE = "t.py::test_x: kvm_guest_factory share="


def test_paths_and_share_values(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shares = parse_shares(
        {str(tmp_path / "a"): "/mnt/a/", tmp_path / "b": Share("/mnt//b", rw=True)}, WHERE
    )
    assert shares == (
        SharedDir(tmp_path / "a", "/mnt/a", rw=False),
        SharedDir(tmp_path / "b", "/mnt/b", rw=True),
    )
    assert parse_shares(None, WHERE) == () and parse_shares({}, WHERE) == ()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (["/x"], "['/x'] is not a dict of host folder -> guest path"),
        ("/srv:/mnt", "'/srv:/mnt' is not a dict"),
        (
            {"/nonexistent/pytest-kvm": "/mnt"},
            "host folder '/nonexistent/pytest-kvm' does not exist",
        ),
        ({"{dir}/file": "/mnt"}, "host folder '{dir}/file' is not a directory"),
        ({"{dir}": "mnt/x"}, "guest path 'mnt/x' for '{dir}' is not an absolute path"),
        ({"{dir}": "/"}, "guest path '/' for '{dir}': not the root"),
        ({"{dir}": 5}, "guest path 5 for '{dir}' is not a path or Share(...)"),
        ({"{dir}": Share("/mnt", rw="yes")}, "rw='yes' for '{dir}' is not True or False"),
        ({"{dir}/with,comma": "/mnt"}, "has a comma or newline, which QEMU options cannot carry"),
        ({"{dir}": "/mnt/x", "{dir}/sub": "/mnt/x/"}, "guest path '/mnt/x' is given twice"),
    ],
)
def test_bad_shares_are_one_line_naming_value_and_source(
    tmp_path: Path, value: object, message: str
) -> None:
    (tmp_path / "file").write_text("")
    (tmp_path / "sub").mkdir()
    (tmp_path / "with,comma").mkdir()
    if isinstance(value, dict):
        value = {k.replace("{dir}", str(tmp_path)): v for k, v in value.items()}
    with pytest.raises(KvmConfigError) as info:
        parse_shares(value, WHERE)
    text = str(info.value)
    assert text.startswith(WHERE + ": ") and "\n" not in text
    assert message.replace("{dir}", str(tmp_path)) in text


def test_too_many_shares(tmp_path: Path) -> None:
    value = {}
    for index in range(MAX_SHARES + 1):
        (tmp_path / str(index)).mkdir()
        value[str(tmp_path / str(index))] = f"/mnt/{index}"
    with pytest.raises(KvmConfigError, match=f"9 shares; at most {MAX_SHARES}"):
        parse_shares(value, WHERE)


def test_factory_shares_go_on_top_of_the_markers(tmp_path: Path) -> None:
    for name in ("m1", "m2", "f"):
        (tmp_path / name).mkdir()
    settings = Settings().with_marker(
        {"share": {str(tmp_path / "m1"): "/mnt/one", str(tmp_path / "m2"): "/mnt/two"}}, "t.py::t"
    )
    assert [s.dest for s in settings.share] == ["/mnt/one", "/mnt/two"]
    request = GuestRequest.build("t.py::t: kvm_guest_factory", share={tmp_path / "f": "/mnt/two"})
    merged = request.shares(settings)
    assert merged == (SharedDir(tmp_path / "m1", "/mnt/one"), SharedDir(tmp_path / "f", "/mnt/two"))
    # Without share= the marker's stand.
    assert GuestRequest.build("t.py::t: kvm_guest_factory").shares(settings) == settings.share
    assert merge_shares(settings.share, (), "w") == settings.share


def test_marker_and_factory_errors_name_their_source(tmp_path: Path) -> None:
    with pytest.raises(KvmConfigError, match=r"^t.py::t \(@pytest.mark.kvm share=\): host folder"):
        Settings().with_marker({"share": {"/nonexistent/x": "/mnt"}}, "t.py::t")
    with pytest.raises(
        KvmConfigError, match=r"^t.py::t: kvm_guest_factory share=: 3 is not a dict"
    ):
        GuestRequest.build("t.py::t: kvm_guest_factory", share=3)  # type: ignore[arg-type]


def test_qemu_argv_has_a_9p_device_per_share_at_fixed_slots(tmp_path: Path) -> None:
    shares = (SharedDir(Path("/srv/ro"), "/mnt/ro"), SharedDir(Path("/srv/rw"), "/mnt/rw", True))
    argv = build_argv(spec(tmp_path, shares=shares))
    assert opt(argv, "-fsdev") == [
        "local,id=fsdev0,path=/srv/ro,security_model=none,readonly=on",
        "local,id=fsdev1,path=/srv/rw,security_model=none",
    ]
    devices = opt(argv, "-device")
    assert (
        "virtio-9p-pci,id=share0,fsdev=fsdev0,mount_tag=kvmshare0,bus=pcie.0,addr=0x10" in devices
    )
    assert (
        "virtio-9p-pci,id=share1,fsdev=fsdev1,mount_tag=kvmshare1,bus=pcie.0,addr=0x11" in devices
    )
    # A restored clone: the share devices come with the same -incoming as ever.
    clone = build_argv(spec(tmp_path, shares=shares, incoming=tmp_path / "state"))
    assert clone[-2:] == ["-incoming", "defer"] and "-fsdev" in clone
    assert "-fsdev" not in build_argv(spec(tmp_path))


def test_mount_script_quotes_and_mounts_read_only_unless_rw() -> None:
    shares = (
        SharedDir(Path("/srv/a"), "/mnt/it's $(x)"),
        SharedDir(Path("/srv/b"), "/mnt/out", rw=True),
    )
    script = mount_script(shares, rescan=True)
    lines = script.splitlines()
    assert lines[:3] == ["set -e", "echo 1 > /sys/bus/pci/rescan", "modprobe -a 9pnet_virtio 9p"]
    quoted = shlex.quote("/mnt/it's $(x)")
    assert f"mkdir -p -- {quoted}" in lines
    assert (
        f"mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,ro kvmshare0 {quoted}" in lines
    )
    assert "mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 kvmshare1 /mnt/out" in lines
    assert "rescan" not in mount_script(shares, rescan=False)


def test_shares_need_ssh(tmp_path: Path) -> None:
    image = Image("img", tmp_path / "x.qcow2", "qcow2", "img")
    config = GuestConfig(image=image, ssh=False, shares=(SharedDir(tmp_path, "/mnt"),))
    with pytest.raises(KvmConfigError, match="share= is mounted in the guest over SSH"):
        check_config(config)
    # A share does not stop a guest from being restored (and adds nothing to its shape).
    assert GuestConfig(image=image, shares=(SharedDir(tmp_path, "/mnt"),)).restore_refusal() == ""


SHARES = (SharedDir(Path("/srv/ro"), "/mnt/ro"), SharedDir(Path("/srv/rw"), "/mnt/rw", True))


def _filesystems(xml: str) -> list[tuple[str, str, str, bool, str]]:
    root = ET.fromstring(xml)
    return [
        (
            fs.get("accessmode", ""),
            fs.find("source").get("dir", ""),  # type: ignore[union-attr]
            fs.find("target").get("dir", ""),  # type: ignore[union-attr]
            fs.find("readonly") is not None,
            fs.find("address").get("slot", ""),  # type: ignore[union-attr]
        )
        for fs in root.findall("devices/filesystem")
    ]


EXPECTED = [
    ("squash", "/srv/ro", "kvmshare0", True, "0x10"),
    ("squash", "/srv/rw", "kvmshare1", False, "0x11"),
]


def test_libvirt_domain_xml_has_a_9p_filesystem_per_share(tmp_path: Path) -> None:
    xml = domain_xml(libvirt_spec(tmp_path, shares=SHARES), "pytest-kvm-x", "qemu", DISKS)
    assert _filesystems(xml) == EXPECTED
    assert _filesystems(domain_xml(libvirt_spec(tmp_path), "x", "qemu", DISKS)) == []


def test_libvirt_clone_xml_gets_the_shares_its_template_never_had() -> None:
    saved = "<domain type='qemu'><name>t</name><uuid>u</uuid><devices/></domain>"
    xml = clone_xml(saved, "clone", [], (), METADATA_NS, shares=SHARES)
    assert _filesystems(xml) == EXPECTED
    assert _filesystems(clone_xml(saved, "clone", [], (), METADATA_NS)) == []
