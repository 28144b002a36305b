"""The catalog images are what their names say: release, OpenSSH, init system.

Run for the catalog images given (others skip):

    pytest tests/integration/test_catalog.py --kvm-image debian-11 --kvm-image debian-13 \
        --kvm-image debian-testing --kvm-image debian-12-sysvinit -v

scripts/test-matrix.sh runs it over debian-11, 12, 13 and debian-12-sysvinit. Each
image's guests are restored from its template, and making that template is the
image's cold boot (its time: bench/RESULTS.md, "Catalog image builds").
test_minimal_variant_is_smaller runs with debian-12 only: it builds debian-12-minimal
and its template once per cache (a build and a boot: bench/RESULTS.md, "A real Debian
system's package set").
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
    # a real Debian system's package set (Priority important + cloud-image tools);
    # False: the small variant (debian-12-minimal)
    full: bool = True


FACTS = {
    "debian-11": Facts("bullseye", "8.4", "systemd"),
    "debian-12": Facts("bookworm", "9.2", "systemd"),
    "debian-13": Facts("trixie", "10.0", "systemd"),
    "debian-testing": Facts(None, None, "systemd"),
    "debian-12-sysvinit": Facts("bookworm", "9.2", "init"),
    "debian-12-minimal": Facts("bookworm", "9.2", "systemd", full=False),
}
# What a new user reaches for on any Debian system (issue 21): none was in debian-12
# before it carried Priority important and what Debian's cloud images add.
TOOLS = ("ping", "curl", "wget", "cron", "nano", "vim.tiny", "man", "nc", "traceroute", "gpg")
INSTALLED = "dpkg-query -W -f '${db:Status-Status}\\n' | grep -cx installed"
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


def missing_tools(guest) -> list[str]:
    script = 'for t in "$@"; do command -v "$t" >/dev/null || echo "$t"; done'
    return guest.succeed(f"sh -c {shlex.quote(script)} sh {shlex.join(TOOLS)}").split()


def test_a_real_debian_systems_tools(facts, kvm_guest):
    """The catalog images carry a real system's package set: a test of a cron job,
    or one that pings a peer, does not fail for a reason no real system has."""
    if not facts.full:
        pytest.skip(f"{kvm_guest.image.name} is the small variant")
    assert missing_tools(kvm_guest) == []
    kvm_guest.succeed("dpkg-query -W tzdata && test -f /usr/share/zoneinfo/Europe/Paris")
    assert kvm_guest.succeed("man -w ls").strip().startswith("/usr/share/man/man1/ls.1")
    kvm_guest.succeed("ping -c 1 -W 10 127.0.0.1")
    if facts.init == "systemd":
        kvm_guest.wait_for_unit("cron.service", timeout=60)
        # timers that would fire while a test runs stay off, man-db's among them
        assert kvm_guest.run(
            "systemctl is-enabled man-db.timer apt-daily.timer"
        ).stdout.split() == [
            "disabled",
            "disabled",
        ]
    else:
        kvm_guest.wait_until_succeeds("service cron status", timeout=60)
        # still no systemd on the sysvinit image
        kvm_guest.fail("dpkg-query -W -f '${db:Status-Status}' systemd | grep -qx installed")


def test_esp_is_mounted_on_boot_efi(facts, kvm_guest):
    """Like an installed system, the image mounts its EFI system partition on /boot/efi
    (from /etc/fstab, whatever the firmware): grub-install, update-grub and shim's
    updates in a guest find it there."""
    assert kvm_guest.succeed("findmnt -n -o FSTYPE /boot/efi").strip() == "vfat"
    kvm_guest.succeed("test -f /boot/efi/EFI/BOOT/BOOTX64.EFI")
    assert "/boot/efi" in kvm_guest.succeed("grep -v '^#' /etc/fstab")


def test_minimal_variant_is_smaller(kvm_image, kvm_guest, kvm_guest_factory):
    """debian-12-minimal keeps the small package set debian-12 had (for speed): fewer
    packages, and the tools a real system has are missing there."""
    if kvm_image.name != "debian-12":
        pytest.skip("compares debian-12 with debian-12-minimal")
    minimal = kvm_guest_factory(image="debian-12-minimal")
    full_count = int(kvm_guest.succeed(INSTALLED))
    minimal_count = int(minimal.succeed(INSTALLED))
    assert minimal_count < full_count
    assert "curl" in missing_tools(minimal)
