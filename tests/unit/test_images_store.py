import subprocess

import pytest

from pytest_kvm.errors import ImageError, KvmConfigError
from pytest_kvm.images.store import check_spec, classify, image_name, validate_path


@pytest.mark.parametrize(
    ("spec", "kind", "name"),
    [
        ("debian-12", "catalog", "debian-12"),
        ("./my-appliance.qcow2", "path", "my-appliance"),
        ("/srv/images/web.img", "path", "web"),
        ("disk.raw", "path", "disk"),
        ("https://example.invalid/a.qcow2#sha256=ab", "url", "a"),
    ],
)
def test_classify_and_names(spec, kind, name):
    assert classify(spec) == kind
    assert image_name(spec) == name


def test_qcow2_and_raw_disks_are_accepted(tmp_path):
    q = tmp_path / "a.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(q), "16M"], check=True)
    assert validate_path(q, "a.qcow2") == ("qcow2", 16 << 20)
    raw = tmp_path / "b.img"
    raw.write_bytes(b"\0" * 510 + b"\x55\xaa" + b"\0" * ((2 << 20) - 512))
    assert validate_path(raw, "b.img") == ("raw", 2 << 20)


def test_raw_without_partition_table_is_not_a_disk(tmp_path):
    raw = tmp_path / "c.img"
    raw.write_bytes(b"\0" * (2 << 20))
    with pytest.raises(ImageError, match="no partition table"):
        validate_path(raw, "c.img")


def test_directory_is_refused(tmp_path):
    with pytest.raises(ImageError, match="not a regular file"):
        validate_path(tmp_path, "dir")


def test_names_that_are_neither(tmp_path):
    with pytest.raises(KvmConfigError, match="not a path, URL or catalog name"):
        check_spec("Debian 12")
