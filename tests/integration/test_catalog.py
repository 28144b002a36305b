"""The catalog images are what their names say: release, OpenSSH, init system.

Run for the catalog images given (others skip):

    pytest tests/integration/test_catalog.py --kvm-image debian-11 --kvm-image debian-13 \
        --kvm-image debian-testing --kvm-image debian-12-sysvinit -v

scripts/test-matrix.sh runs it over debian-11, 12, 13 and debian-12-sysvinit. Each
image's guests are restored from its template, and making that template is the
image's cold boot (its time: bench/RESULTS.md, "Catalog image builds").
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

import pytest

from pytest_kvm.errors import GuestError


@dataclass(frozen=True)
class Facts:
    codename: str | None  # os-release VERSION_CODENAME; None: testing (moves)
    openssh: str | None  # "major.minor"; None: testing (moves), at least 10.0 there
    init: str  # what PID 1 is: "systemd" or "init" (sysvinit)


FACTS = {
    "debian-11": Facts("bullseye", "8.4", "systemd"),
    "debian-12": Facts("bookworm", "9.2", "systemd"),
    "debian-13": Facts("trixie", "10.0", "systemd"),
    "debian-testing": Facts(None, None, "systemd"),
    "debian-12-sysvinit": Facts("bookworm", "9.2", "init"),
}
RELEASED = ("bullseye", "bookworm", "trixie")


@pytest.fixture
def facts(kvm_image) -> Facts:  # before kvm_guest: an unknown image skips unbooted
    if kvm_image.name not in FACTS:
        pytest.skip(f"no catalog facts for image {kvm_image.name!r}")
    return FACTS[kvm_image.name]


def os_release(guest) -> dict[str, str]:
    values = {}
    for line in guest.succeed("cat /etc/os-release").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key] = value.strip().strip('"')
    return values


def test_release_facts(facts, kvm_guest, record_property):
    record_property("boot_timings", dict(kvm_guest.boot_timings))
    release = os_release(kvm_guest)
    if facts.codename is not None:
        assert release["VERSION_CODENAME"] == facts.codename
    else:  # testing: the next release's code name, and a "/sid" debian_version
        assert release["VERSION_CODENAME"] not in RELEASED
        assert kvm_guest.succeed("cat /etc/debian_version").strip().endswith("/sid")

    # "OpenSSH_9.2p1 Debian-2+deb12u3, OpenSSL 3.0.15 ..." on stderr
    banner = kvm_guest.run("sshd -V").stderr + kvm_guest.run("ssh -V").stderr
    versions = set(re.findall(r"OpenSSH_(\d+\.\d+)", banner))
    assert len(versions) == 1, banner
    (version,) = versions
    if facts.openssh is not None:
        assert version == facts.openssh
    else:
        assert tuple(map(int, version.split("."))) >= (10, 0)

    pid1 = kvm_guest.succeed("cat /proc/1/comm").strip()
    assert pid1 == facts.init
    assert kvm_guest.init_system == ("systemd" if facts.init == "systemd" else pid1)
    # merged /usr: dpkg may know /sbin/init under its unmerged name
    exe = kvm_guest.succeed("readlink -f /proc/1/exe").strip()
    unmerged = exe.removeprefix("/usr")
    package = kvm_guest.succeed(
        f"dpkg -S {shlex.quote(exe)} 2>/dev/null || dpkg -S {shlex.quote(unmerged)}"
    ).split(":")[0]
    assert package == ("systemd" if facts.init == "systemd" else "sysvinit-core")


def test_services_and_wait_for_unit(facts, kvm_guest):
    """A clone (restored from the image's template) is its own machine, and
    wait_for_unit answers truly: on sysvinit, a clear error, not a guess."""
    assert kvm_guest.succeed("hostname").strip() == kvm_guest.name[:63]
    assert kvm_guest.succeed("cat /etc/hostname").strip() == kvm_guest.name[:63]
    if facts.init == "systemd":
        kvm_guest.wait_for_unit("ssh.service", timeout=60)
        kvm_guest.fail("test -e /etc/init.d/nonexistent")
        return
    kvm_guest.fail("test -d /run/systemd/system")
    with pytest.raises(GuestError, match=r"has no systemd \(PID 1 is 'init'") as info:
        kvm_guest.wait_for_unit("ssh.service", timeout=10)
    assert "wait_until_succeeds('service ssh status')" in str(info.value)
    # what the error suggests works
    kvm_guest.wait_until_succeeds("service ssh status", timeout=60)
    # the network came from ifupdown's DHCP on eth0, cloud-init ran
    kvm_guest.succeed("ip -4 -o address show dev eth0 | grep -q 'inet '")
    kvm_guest.succeed("pgrep -x dhclient")
    kvm_guest.wait_until_succeeds("cloud-init status | grep -q 'status: done'", timeout=120)
