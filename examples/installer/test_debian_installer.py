"""The real Debian installer, driven by pytest-kvm: netboot, preseed, install, test.

Debian 12's netboot kernel and initrd (package ``debian-installer-12-netboot-amd64``,
fetched by ``conftest.py``) boot on a blank 8 GiB disk; the preseed file, served by
the plugin's ``kvm_http``, answers every question; the installer downloads its
components and packages from the Debian mirror in this machine's apt sources through
QEMU's user networking, installs GRUB and powers off. The installed disk then boots
with the plugin's cloud-init seed and the test logs in over SSH as root.

Slow (tens of minutes under TCG): skipped unless ``--run-slow`` or ``PYTEST_KVM_SLOW=1``.
Before anything boots, ``installer_mirror`` (conftest.py) checks that the mirror
serves the installer components the netboot initrd downloads.

    pytest examples/installer --kvm-image debian-12 --run-slow -s

``PYTEST_KVM_INSTALLER_MIRROR=http://HOST/debian`` sets the mirror the guest uses
(default: ``PYTEST_KVM_MIRROR``, else the host's apt sources); a mirror on this host's
loopback is rewritten to the address the guest sees it at (10.0.2.2).
``PYTEST_KVM_INSTALLER_SAVE=PATH`` keeps the installed disk as a qcow2 image.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from pytest_kvm.media import USER_NET_HOST

HERE = Path(__file__).resolve().parent
MIRROR_ENV = "PYTEST_KVM_INSTALLER_MIRROR"  # read by conftest.py's installer_mirror
SAVE_ENV = "PYTEST_KVM_INSTALLER_SAVE"
HOSTNAME = "installed"
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")

# What d-i's text frontend shows as it goes, in order, and how long each step may take
# on a machine with KVM (multiplied by the guest's timeout scale, 3 under TCG). An
# install that stops at a step fails there, naming the step and the console's tail.
STEPS = (
    ("the installer booted", r"Detecting network hardware", 300),
    ("the preseed was read, components load", r"Loading additional components", 600),
    ("the base system installs", r"Installing the base system", 900),
    ("software installs (pkgsel)", r"Select and install software", 1500),
    ("GRUB installs", r"Install(ing)? (the )?GRUB", 900),
    ("the installation finishes", r"Finishing the installation", 600),
)
# The text frontend's prompt: a question the preseed did not answer.
QUESTION = r"Prompt: '\?' for help"


def guest_view(mirror: str) -> tuple[str, str, str]:
    """(protocol, host[:port], directory) of the mirror as the guest sees it."""
    parts = urlsplit(mirror)
    if parts.scheme not in ("http", "https", "ftp") or not parts.hostname:
        pytest.fail(
            f"the installer needs an http(s) or ftp mirror, not {mirror!r}; "
            f"set {MIRROR_ENV}=http://HOST/debian",
            pytrace=False,
        )
    host = parts.netloc.rsplit("@", 1)[-1]
    if parts.hostname in LOOPBACK:  # the host's loopback, as QEMU's user network shows it
        host = USER_NET_HOST + (f":{parts.port}" if parts.port else "")
    return parts.scheme, host, parts.path.rstrip("/") or "/"


def render_preseed(mirror: str, root_password: str) -> str:
    protocol, host, directory = guest_view(mirror)
    fields = {
        "@PROTOCOL@": protocol,
        "@MIRROR_HOST@": host,
        "@MIRROR_DIRECTORY@": directory,
        "@HOSTNAME@": HOSTNAME,
        "@ROOT_PASSWORD@": root_password,
    }
    text = (HERE / "preseed.cfg.in").read_text()
    for name, value in fields.items():
        text = text.replace(name, value)
    left = sorted(set(re.findall(r"@[A-Z_]+@", text)))
    assert not left, f"preseed.cfg.in has unfilled fields: {left}"
    return text


def follow_install(inst, scale: float, timings: dict[str, float]) -> None:
    """Expect the steps on the console in turn; fail at once on an unanswered question.

    Any later step counts too (a step whose title scrolled by unseen is not an error),
    so the wait is for whichever comes next, as long as the next step may take."""
    __tracebackhide__ = True
    started = time.monotonic()
    index = 0
    while index < len(STEPS):
        alternatives = "|".join(
            f"(?P<s{i}>{step})" for i, (_, step, _) in enumerate(STEPS) if i >= index
        )
        pattern = re.compile(f"{alternatives}|(?P<question>{QUESTION})")
        what, _, budget = STEPS[index]
        try:
            match = inst.console.expect(pattern, timeout=budget * scale)
        except TimeoutError as exc:
            pytest.fail(f"the install stalled: expected {what!r} next. {exc}", pytrace=False)
        if match.group("question"):
            pytest.fail(
                f"the installer asked a question the preseed does not answer (next step "
                f"expected: {what}); console tail:\n{inst.console.read_all()[-3000:]}",
                pytrace=False,
            )
        index = next(i for i in range(index, len(STEPS)) if match.group(f"s{i}"))
        what = STEPS[index][0]
        timings[what] = time.monotonic() - started
        print(f"installer: {what} after {timings[what]:.0f} s", flush=True)
        index += 1


@pytest.mark.slow
def test_debian_installer(kvm_guest_factory, kvm_http, netboot, installer_mirror):
    t0 = time.monotonic()
    password = secrets.token_urlsafe(12)
    url = kvm_http.serve("preseed.cfg", render_preseed(installer_mirror, password))
    inst = kvm_guest_factory(
        kernel=netboot.linux,
        initrd=netboot.initrd,
        append=(
            f"auto=true priority=critical url={url} DEBIAN_FRONTEND=text "
            f"hostname={HOSTNAME} domain=localdomain console=ttyS0,115200n8"
        ),
        disk_size="8G",
        memory=2048,
        ssh=False,
    )
    scale = inst.timeout_scale
    timings: dict[str, float] = {"netboot download": netboot.fetch_seconds}
    follow_install(inst, scale, timings)
    assert ("GET", "/preseed.cfg", 200) in kvm_http.requests
    inst.console.expect(r"pytest-kvm: late_command done", timeout=60 * scale)
    inst.wait_for_shutdown(timeout=600)
    timings["install"] = time.monotonic() - t0
    print(f"installer: powered off after {timings['install']:.0f} s", flush=True)

    t1 = time.monotonic()
    guest = inst.boot_installed()
    timings["first boot to SSH"] = time.monotonic() - t1
    print(f"installed system: SSH after {timings['first boot to SSH']:.0f} s", flush=True)

    # It is the system the preseed asked for.
    assert guest.succeed("cat /etc/debian_version").startswith("12.")
    assert guest.succeed("findmnt -no FSTYPE /").strip() == "ext4"
    assert guest.succeed('lsblk -no PKNAME "$(findmnt -no SOURCE /)"').strip() == "vda"
    assert "console=ttyS0" in guest.succeed("cat /proc/cmdline")
    installed = guest.succeed(
        "dpkg-query -W -f '${Package} ${Status}\\n' openssh-server cloud-init"
    )
    assert installed.count("install ok installed") == 2, installed
    protocol, host, directory = guest_view(installer_mirror)
    sources = guest.succeed("cat /etc/apt/sources.list")
    assert f"{protocol}://{host}{directory}" in sources and "bookworm" in sources
    assert guest.succeed("swapon --show --noheadings").strip() == ""  # no swap partition
    # A working system: it boots to multi-user, sshd runs, GRUB and the kernel are Debian's.
    guest.wait_for_unit("ssh.service")
    assert guest.succeed("uname -r").strip().endswith("-amd64")
    assert guest.succeed("test -f /boot/grub/grub.cfg && echo ok").strip() == "ok"
    packages = int(guest.succeed("dpkg-query -W -f '.\\n' | wc -l"))
    print(f"installed system: {packages} packages", flush=True)
    guest.shutdown()

    timings["whole test"] = time.monotonic() - t0 + netboot.fetch_seconds
    print(
        "installer timings: "
        + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items()),
        flush=True,
    )
    save = os.environ.get(SAVE_ENV, "").strip()
    if save:
        kept = inst.save_image(Path(save))
        print(f"installed disk kept as {kept} (--kvm-image {kept})", flush=True)
