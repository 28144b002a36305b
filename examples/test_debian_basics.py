"""Example suite: what a user of pytest-kvm writes to test a Debian system for real.

Run it:  pytest examples/ --kvm-image debian-12 -v
Over the catalog:  pytest examples/ --kvm-image debian-11 --kvm-image debian-12 \
    --kvm-image debian-13 --kvm-image debian-12-sysvinit -n 2 --kvm-dist-by-image
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

UNIT = """\
[Unit]
Description=hello-web example service

[Service]
ExecStart=/usr/bin/python3 -m http.server 8080 --bind 127.0.0.1 --directory /srv/hello-web
DynamicUser=yes

[Install]
WantedBy=multi-user.target
"""


def build_deb(workdir: Path) -> Path:
    """A small Debian package with a static page and a systemd service serving it."""
    root = workdir / "hello-web"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        "Package: hello-web\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: pytest-kvm example <nobody@localhost>\nDepends: python3\n"
        "Description: example service for pytest-kvm\n"
    )
    postinst = root / "DEBIAN" / "postinst"
    postinst.write_text(
        "#!/bin/sh\nset -e\nsystemctl daemon-reload\nsystemctl enable --now hello-web.service\n"
    )
    postinst.chmod(0o755)
    (root / "lib/systemd/system").mkdir(parents=True)
    (root / "lib/systemd/system/hello-web.service").write_text(UNIT)
    (root / "srv/hello-web").mkdir(parents=True)
    (root / "srv/hello-web/index.html").write_text("<h1>hello from the guest</h1>\n")
    deb = workdir / "hello-web_1.0_all.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "--build", str(root), str(deb)],
        check=True,
        capture_output=True,
    )
    return deb


@pytest.mark.kvm_skip_image(
    "debian-12-sysvinit", reason="the package ships a systemd unit; that image runs sysvinit"
)
def test_package_installs_and_its_service_serves(kvm_guest, tmp_path):
    deb = build_deb(tmp_path)
    kvm_guest.put(deb, "/tmp/hello-web.deb")
    kvm_guest.succeed("dpkg -i /tmp/hello-web.deb")
    assert "install ok installed" in kvm_guest.succeed("dpkg-query -W -f='${Status}' hello-web")
    kvm_guest.wait_for_unit("hello-web.service")
    kvm_guest.wait_for_port(8080)
    page = kvm_guest.succeed(
        "python3 -c 'import urllib.request as u; "
        'print(u.urlopen("http://127.0.0.1:8080/").read().decode())\''
    )
    assert "hello from the guest" in page
    assert kvm_guest.succeed("systemctl is-enabled hello-web.service").strip() == "enabled"


def test_config_file_written_and_read_back(kvm_guest, tmp_path):
    config = tmp_path / "app.conf"
    config.write_text("[server]\nport = 8080\nname = my app\n")
    target = "/etc/my app/app.conf"  # a path with a space: quoted on its way in
    kvm_guest.succeed(f"mkdir -p {shlex.quote(str(Path(target).parent))}")
    kvm_guest.put(config, target)
    kvm_guest.succeed(f"sed -i 's/^port = .*/port = 9090/' {shlex.quote(target)}")
    assert "port = 9090" in kvm_guest.succeed(f"cat {shlex.quote(target)}")
    back = kvm_guest.get(target, tmp_path / "back.conf")
    assert back.read_text() == "[server]\nport = 9090\nname = my app\n"
    mode = kvm_guest.succeed(f"stat -c %a {shlex.quote(target)}").strip()
    assert mode in ("644", "600")


def test_reboot_keeps_state(kvm_guest):
    kvm_guest.succeed("echo 'vm.swappiness = 7' > /etc/sysctl.d/90-example.conf")
    kvm_guest.reboot()
    assert kvm_guest.succeed("cat /proc/sys/vm/swappiness").strip() == "7"
    if kvm_guest.init_system == "systemd":
        kvm_guest.wait_for_unit("ssh.service")
    else:  # sysvinit: wait_for_unit is an error there, the init script answers
        kvm_guest.wait_until_succeeds("service ssh status")
    assert kvm_guest.succeed("uptime -p").startswith("up")
