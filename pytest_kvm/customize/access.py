"""Access for images without cloud-init: the run's SSH key, the guest's pinned host
key, its host name and a DHCP network, written into its overlay before it boots."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import ImageError
from .handle import DiskHandle

NETWORKD_FILE = "/etc/systemd/network/90-pytest-kvm.network"
# KeepConfiguration=dhcp: a DHCP client restart never drops the address a test
# reaches a bridge guest at (as in the catalog images).
NETWORKD_CONFIG = b"[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\nKeepConfiguration=dhcp\n"
SSHD_DROP_IN = b"PasswordAuthentication no\nKbdInteractiveAuthentication no\n"


@dataclass(frozen=True)
class Access:
    """What cloud-init's seed would have given a guest, for an image without it."""

    user: str
    authorized_key: str
    host_key_private: str
    host_key_public: str
    hostname: str | None  # None: keep the image's


def inject_access(disk: DiskHandle, access: Access) -> None:
    """Key, pinned host key, host name and DHCP on every NIC, written into the disk."""
    g = disk.g
    home = "/root" if access.user == "root" else f"/home/{access.user}"
    if not g.is_dir(home):
        raise ImageError(f"{disk.what}: user {access.user!r} has no home {home} in the image")
    disk.write_file(f"{home}/.ssh/authorized_keys", access.authorized_key.encode() + b"\n",
                    0o600, dir_mode=0o700)  # fmt: skip
    g.chmod(0o700, f"{home}/.ssh")
    if access.user != "root":
        uid, gid = _ids(g, access.user)
        for path in (f"{home}/.ssh", f"{home}/.ssh/authorized_keys"):
            g.chown(uid, gid, path)
    if not g.is_dir("/etc/ssh"):
        raise ImageError(f"{disk.what}: no /etc/ssh in the image; is openssh-server installed?")
    for name in g.ls("/etc/ssh"):
        if name.startswith("ssh_host_") and "_key" in name:
            g.rm(f"/etc/ssh/{name}")  # sshd must offer the pinned key and no other
    disk.write_file("/etc/ssh/ssh_host_ed25519_key", access.host_key_private.encode(), 0o600)
    disk.write_file("/etc/ssh/ssh_host_ed25519_key.pub",
                    access.host_key_public.encode() + b"\n", 0o644)  # fmt: skip
    disk.write_file("/etc/ssh/sshd_config.d/10-pytest-kvm.conf", SSHD_DROP_IN, 0o644)
    if access.hostname is not None:
        disk.set_hostname(access.hostname)
    unit = next(
        (p for p in ("/lib/systemd/system/systemd-networkd.service",
                     "/usr/lib/systemd/system/systemd-networkd.service") if g.is_file(p)),
        None,
    )  # fmt: skip
    if unit is None:
        raise ImageError(
            f"{disk.what}: the image has neither cloud-init nor systemd-networkd, so "
            "pytest-kvm cannot set up its network; install one of them in the image"
        )
    disk.write_file(NETWORKD_FILE, NETWORKD_CONFIG, 0o644)
    wants = "/etc/systemd/system/multi-user.target.wants"
    g.mkdir_p(wants)
    link = f"{wants}/systemd-networkd.service"
    if not g.exists(link) and not g.is_symlink(link):
        g.ln_s(unit, link)


def _ids(g: Any, user: str) -> tuple[int, int]:
    for line in g.read_file("/etc/passwd").decode(errors="replace").splitlines():
        fields = line.split(":")
        if len(fields) > 3 and fields[0] == user:
            return int(fields[2]), int(fields[3])
    raise ImageError(f"user {user!r} is not in the image's /etc/passwd")
