"""The image matrix with real guests: ids, kvm_skip_image, xdist grouping by image,
JUnit properties; guest facts (os_release) and the testinfra layer (guest.host)."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pytest_kvm.images.recipe import catalog_names
from pytest_kvm.images.store import catalog_path, image_name


def test_testinfra_host_over_the_guest_connection(kvm_guest, tmp_path):
    pytest.importorskip("testinfra")
    host = kvm_guest.host
    assert host is kvm_guest.host  # one per guest
    # testinfra's commands go over the guest's own paramiko client: the run's key and
    # the pinned host key; it opened no connection of its own.
    assert host.backend.client is kvm_guest.ssh
    assert host.backend.get_connection_type() == "pytest-kvm"
    established = host.run("ss -Htn state established '( sport = :22 )'").stdout
    assert len(established.strip().splitlines()) == 1
    assert host.package("openssh-server").is_installed
    assert host.service("ssh").is_running
    assert host.service("ssh").is_enabled
    assert host.file("/etc/os-release").contains("^ID=")
    assert host.run("echo hi").stdout == "hi\n"
    assert host.run("echo oops >&2; exit 3").rc == 3
    assert host.run("echo oops >&2; exit 3").stderr == "oops\n"
    # testinfra quotes its arguments
    assert host.run("printf '%%s|%%s' %s %s", "it's", "a b").stdout == "it's|a b"
    # Bytes come back as they are (not decoded and re-encoded).
    data = bytes(range(256)) * 64
    (tmp_path / "blob").write_bytes(data)
    kvm_guest.put(tmp_path / "blob", "/root/blob")
    assert host.file("/root/blob").content == data
    # After a new connection, testinfra uses the new one.
    kvm_guest.reconnect()
    assert host.backend.client is kvm_guest.ssh
    assert host.run("true").rc == 0
    # The guest facts agree with testinfra's.
    facts = kvm_guest.os_release
    assert facts["ID"] == host.system_info.distribution
    assert facts["VERSION_ID"] == host.system_info.release.split(".")[0]
    assert facts["VERSION_ID"] in kvm_guest.succeed("grep ^VERSION_ID= /etc/os-release")
    facts["ID"] = "changed"  # a copy: the cached facts stay
    assert kvm_guest.os_release["ID"] == host.system_info.distribution


INNER_SUITE = """
import os
import pytest

def test_os(kvm_guest, kvm_image):
    facts = kvm_guest.os_release
    assert facts["ID"] == "debian"
    print("WORKER", kvm_image.name, os.environ.get("PYTEST_XDIST_WORKER"))

@pytest.mark.kvm_skip_image("{skip}", reason="the catalog one is covered elsewhere")
def test_not_on_catalog(kvm_guest, kvm_image):
    assert kvm_guest.succeed("echo ok").strip() == "ok"
"""


def test_two_images_in_parallel_grouped_with_junit_properties(
    pytester, image_arg, cache_arg, inner_env
):
    """Two images (the catalog name and the path of the same cached file: two "images"
    to the plugin), two xdist workers, each image's tests on one worker."""
    if image_arg not in catalog_names():
        pytest.skip("needs a catalog image (--kvm-image debian-12)")
    cache = Path(cache_arg.split("=", 1)[1])
    path = catalog_path(image_arg, cache)
    if not path.exists():
        pytest.skip(f"{path} is not built yet")
    names = [image_arg, image_name(str(path))]
    assert names[0] != names[1]
    pytester.makepyfile(INNER_SUITE.replace("{skip}", image_arg))
    result = pytester.runpytest_subprocess(
        f"--kvm-image={image_arg}", f"--kvm-image={path}", cache_arg,
        "-p", "no:cacheprovider", "-n", "2", "--kvm-dist-by-image",
        "-v", "-rs", "--junitxml=out.xml",
        timeout=900,
    )  # fmt: skip
    out = result.stdout.str()
    result.assert_outcomes(passed=3, skipped=1)
    assert "each image's tests run on one worker (at most 2 workers busy)" in out
    assert "scheduling tests via ImageScheduling" in out
    # Readable ids; the skip names the image and the reason (-rs).
    ran = {
        test: worker for worker, test in re.findall(r"\[(gw\d)\] \[ *\d+%\] \w+ \S+::(\S+)", out)
    }
    assert set(ran) == {
        f"test_os[{names[0]}]", f"test_os[{names[1]}]",
        f"test_not_on_catalog[{names[0]}]", f"test_not_on_catalog[{names[1]}]",
    }  # fmt: skip
    assert f"pytest-kvm: skipped on {names[0]}: the catalog one is covered elsewhere" in out, out
    # Each image's tests ran on one worker, and the two images on two workers.
    per_image = {name: {w for t, w in ran.items() if t.endswith(f"[{name}]")} for name in names}
    assert all(len(workers) == 1 for workers in per_image.values()), per_image
    assert per_image[names[0]] != per_image[names[1]], per_image
    # JUnit XML: each case names its image; each guest its boot phases in seconds.
    cases = {
        case.get("name"): {p.get("name"): p.get("value") for p in case.iter("property")}
        for case in ET.parse(pytester.path / "out.xml").iter("testcase")
    }
    assert set(cases) == set(ran)
    for test, props in cases.items():
        image = test[test.index("[") + 1 : -1]
        assert props["kvm_image"] == image
        if test == f"test_not_on_catalog[{names[0]}]":  # skipped: no guest
            assert not any(key.startswith("kvm_guest_") for key in props), props
            continue
        assert props["kvm_guest_1"].startswith("kvm-")
        assert props["kvm_guest_1_image"] == image
        timings = {k: float(v) for k, v in props.items() if k.startswith("kvm_guest_1_boot_")}
        assert timings["kvm_guest_1_boot_total"] > 0, props
        assert all(seconds >= 0 for seconds in timings.values()), timings
        assert timings["kvm_guest_1_boot_total"] >= max(timings.values()) - 1e-3
