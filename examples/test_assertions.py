"""Example: checking a guest with testinfra (guest.host) and guest facts, per image.

Run it:  pytest examples/test_assertions.py --kvm-image debian-12 --kvm-image debian-13 -rs
(needs pytest-testinfra: pip install pytest-testinfra)
"""

from __future__ import annotations

import pytest


def test_ssh_server_is_installed_and_running(kvm_guest):
    pytest.importorskip("testinfra")
    host = kvm_guest.host
    assert host.package("openssh-server").is_installed
    assert host.service("ssh").is_running
    assert host.service("ssh").is_enabled
    assert host.file("/etc/os-release").contains(f"^ID={kvm_guest.os_release['ID']}$")
    assert host.run("echo hi").stdout == "hi\n"


def test_password_logins_are_off(kvm_guest):
    pytest.importorskip("testinfra")
    if kvm_guest.os_release.get("ID") not in ("debian", "ubuntu"):
        pytest.skip("sshd -T output is checked on Debian-like guests only")
    # Lower-cased: newer OpenSSH (debian-testing's) prints "PasswordAuthentication no".
    settings = kvm_guest.host.run("sshd -T").stdout.lower().splitlines()
    assert "passwordauthentication no" in settings
