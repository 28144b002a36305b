"""The installer toolkit with real guests: a network-boot style kernel on a blank disk,
driven through the serial console, the keyboard and the screen, watched over VNC;
answer files over HTTP. (The whole install loop is test_installer.py.)"""

from __future__ import annotations

import os
import shlex
import socket
import stat
from pathlib import Path

import pytest

from pytest_kvm.display import png_size
from pytest_kvm.errors import GuestError, GuestTimeout, KvmConfigError
from tests.integration.support.tiny_boot import build_tiny_iso
from tests.support.images import decode_png


def _host_boot_files() -> tuple[Path, Path]:
    kernels = sorted(Path("/boot").glob("vmlinuz-*"))
    initrds = sorted(Path("/boot").glob("initrd.img-*"))
    if not kernels or not initrds:
        pytest.fail("needs the host's kernel and initrd (scripts/setup.sh installs them)")
    return kernels[-1], initrds[-1]


def _rfb_security_types(port: int) -> list[int]:
    """Speak the start of the VNC (RFB 3.8) handshake: which authentications it offers."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        version = sock.recv(12)
        assert version.startswith(b"RFB 003.")
        sock.sendall(b"RFB 003.008\n")
        count = sock.recv(1)[0]
        return list(sock.recv(count))


@pytest.mark.kvm(vnc=True)
def test_kernel_boot_on_blank_disk_keys_screen_and_vnc(kvm_guest_factory, tmp_path):
    """Debian's own kernel and initrd (as a netboot installer would be), stopped in the
    initramfs shell: a blank disk of the asked size, console send/expect, keys typed
    on the VGA console showing on the screen, a screenshot, VNC with a password."""
    kernel, initrd = _host_boot_files()
    inst = kvm_guest_factory(
        kernel=kernel,
        initrd=initrd,
        append="console=tty0 console=ttyS0 nomodeset break=mount",
        disk_size="64M",
        ssh=False,
    )
    assert inst.disk_image.exists() and "installing from vmlinuz" in inst.describe()
    inst.console.expect(r"\(initramfs\) ", timeout=300)
    # The disk is the empty one asked for: 64 MiB of zeros.
    inst.console.send("cat /sys/block/vda/size; head -c 1048576 /dev/vda | tr -d '\\0' | wc -c\n")
    inst.console.expect(r"131072\s+0\s", timeout=60)
    # Keys typed on the keyboard reach the VGA console (echoed while tty1 is open).
    inst.console.send("cat /dev/tty1 > /typed &\n")
    inst.console.expect(r"\(initramfs\) ", timeout=60)
    inst.type_text("Hello kvm-42!\n")
    inst.send_keys("h", "i", "ret")
    inst.console.send("sleep 2; cat /typed\n")
    inst.console.expect(r"Hello kvm-42!\s+hi\s", timeout=60)
    assert "Hello kvm-42!" in inst.screen_text()
    shot = inst.screenshot(tmp_path / "screen.png")
    assert png_size(shot.read_bytes())[0] >= 640
    with pytest.raises(KvmConfigError, match="unknown key"):
        inst.send_keys("no-such-key")
    # VNC: on 127.0.0.1 only, asks for a password (RFB security type 2, nothing else),
    # and the password is in a private file, not on QEMU's command line.
    assert inst.vnc is not None and inst.vnc[0] == "127.0.0.1"
    assert _rfb_security_types(inst.vnc[1]) == [2]
    secret = inst.vnc_password_file
    assert secret is not None and stat.S_IMODE(secret.stat().st_mode) == 0o600
    password = secret.read_text().strip()
    assert len(password) == 8
    argv = " ".join(inst.machine.argv)
    assert "127.0.0.1:0,to=99,password=on" in argv and password not in argv
    assert password not in inst.serial_log.read_text()
    # An installer that does not power off: the timeout shows the screen and console.
    with pytest.raises(GuestTimeout, match=r"(?s)did not power off.*the screen shows:.*Hello"):
        inst.wait_for_shutdown(timeout=1)
    with pytest.raises(GuestError, match="needs it stopped"):
        inst.save_image(tmp_path / "early.qcow2")
    inst.console.send("echo written > /dev/vda; sync; poweroff -f\n")
    inst.wait_for_shutdown(timeout=120)
    saved = inst.save_image(tmp_path / "saved disk.qcow2")
    assert saved.read_bytes()[:4] == b"QFI\xfb"
    assert not list(tmp_path.glob(".*part*"))


def test_screenshot_from_a_qemu_that_cannot_write_png(kvm_guest_factory, tmp_path, monkeypatch):
    """QEMU before 7.1 (no screendump format=) or built without libpng refuses
    format=png with an error: the screenshot is then the PPM it can write, as a PNG."""
    inst = kvm_guest_factory(
        cdrom=build_tiny_iso(tmp_path / "tiny.iso"), boot="cdrom", disk_size="64M", ssh=False
    )
    inst.console.expect("press a key to power off", timeout=120)
    machine = inst.machine
    real_qmp = machine.qmp
    dumps: list[dict[str, object]] = []

    def qemu_without_png(command, **args):
        if command == "screendump":
            dumps.append(dict(args))
            if "format" in args:  # this QEMU itself answers with an error
                args["format"] = "no-png-in-this-build"
        return real_qmp(command, **args)

    monkeypatch.setattr(machine, "qmp", qemu_without_png)
    data = inst.screenshot(tmp_path / "screen.png").read_bytes()
    assert [sorted(d) for d in dumps] == [["filename", "format"], ["filename"]]
    width, height, pixels = decode_png(data)  # checks every chunk's CRC
    assert (width, height) == png_size(data) and width >= 640 and height >= 400
    assert len(set(pixels)) > 1  # the BIOS's text, not a blank frame


def test_answer_files_over_http(kvm_guest, kvm_http):
    """A served file is fetched by the guest from the host address it sees, and the
    server keeps a log of what was asked for; it listens on 127.0.0.1 only."""
    g = kvm_guest
    url = kvm_http.serve("preseed/answers.cfg", "d-i debian-installer/locale string en_US\n")
    prefix = f"http://10.0.2.2:{kvm_http.port}/"
    assert url.startswith(prefix) and url.endswith("/preseed/answers.cfg")
    token = url.removeprefix(prefix).split("/")[0]  # unguessable: in every served URL
    assert kvm_http.local_url.startswith("http://127.0.0.1:")
    fetch = (
        "exec 3<>/dev/tcp/10.0.2.2/{port}; printf 'GET /{path} HTTP/1.0\\r\\n\\r\\n' >&3; cat <&3"
    )
    out = g.succeed(
        "bash -c " + shlex.quote(fetch.format(port=kvm_http.port, path=url.removeprefix(prefix)))
    )
    assert out.startswith("HTTP/1.0 200") and out.endswith("locale string en_US\n")
    for path in (f"{token}/not-there", "preseed/answers.cfg"):  # the latter: no token
        missing = g.succeed("bash -c " + shlex.quote(fetch.format(port=kvm_http.port, path=path)))
        assert missing.startswith("HTTP/1.0 404")
    assert kvm_http.requests == [
        ("GET", "/preseed/answers.cfg", 200),
        ("GET", "/not-there", 404),
        ("GET", "/preseed/answers.cfg", 404),
    ]
    with pytest.raises(KvmConfigError, match="plain relative path"):
        kvm_http.serve("../etc/passwd", "x")
    listening = Path("/proc/net/tcp").read_text()
    assert f"0100007F:{kvm_http.port:04X}" in listening  # 127.0.0.1, not 0.0.0.0
    assert f"00000000:{kvm_http.port:04X}" not in listening


def test_bad_install_media_is_refused_before_anything_starts(kvm_guest_factory, tmp_path):
    not_iso = tmp_path / "not an iso.iso"
    not_iso.write_bytes(os.urandom(64 * 1024))
    with pytest.raises(KvmConfigError, match="does not exist"):
        kvm_guest_factory(cdrom=tmp_path / "missing.iso", boot="cdrom", ssh=False)
    with pytest.raises(KvmConfigError, match="is not an ISO 9660 image"):
        kvm_guest_factory(cdrom=not_iso, boot="cdrom", ssh=False)
    import pycdlib

    plain = tmp_path / "plain.iso"
    iso = pycdlib.PyCdlib()
    iso.new()
    iso.add_fp(__import__("io").BytesIO(b"x"), 1, "/A.;1")
    iso.write(str(plain))
    iso.close()
    with pytest.raises(KvmConfigError, match="not bootable: it has no El Torito"):
        kvm_guest_factory(cdrom=plain, boot="cdrom", ssh=False)
    with pytest.raises(KvmConfigError, match="too small for a disk"):
        kvm_guest_factory(kernel=_host_boot_files()[0], disk_size="1M", ssh=False)
    with pytest.raises(KvmConfigError, match="initrd= and append= need kernel="):
        kvm_guest_factory(append="console=ttyS0", ssh=False)
    with pytest.raises(KvmConfigError, match=r"kernel='.*' does not exist"):
        kvm_guest_factory(kernel=tmp_path / "vmlinuz", ssh=False)
    with pytest.raises(KvmConfigError, match=r"disk='.*' does not exist"):
        kvm_guest_factory(disk=tmp_path / "installed.qcow2")


INNER_FAILING_INSTALLER = """
from pathlib import Path


def test_installer_fails(kvm_guest_factory):
    kernel = sorted(Path("/boot").glob("vmlinuz-*"))[-1]
    initrd = sorted(Path("/boot").glob("initrd.img-*"))[-1]
    inst = kvm_guest_factory(kernel=kernel, initrd=initrd, disk_size="32M", ssh=False,
                             append="console=tty0 console=ttyS0 nomodeset break=mount")
    inst.console.expect(r"\\(initramfs\\) ", timeout=300)
    inst.console.send("echo The-installer-gave-up > /dev/tty0\\n")
    inst.wait_for_console("\\\\(initramfs\\\\) ", timeout=60)
    inst.wait_for_shutdown(timeout=2)
"""


def test_failed_installer_leaves_screenshot_and_screen_text(
    pytester, image_arg, cache_arg, inner_env
):
    """An installer test that fails: its artifacts hold the display's screenshot and
    the text on its screen; the timeout message shows that text too."""
    pytester.makepyfile(test_inner=INNER_FAILING_INSTALLER)
    arts = pytester.path / "arts"
    result = pytester.runpytest_subprocess(
        f"--kvm-image={image_arg}", cache_arg, f"--kvm-artifacts={arts}", timeout=900
    )
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "did not power off within 6 s; the screen shows:" in out
    assert "The-installer-gave-up" in out.split("the screen shows:", 1)[1]
    [shot] = arts.rglob("screen.png")
    width, height = png_size(shot.read_bytes())
    assert width >= 640 and height >= 400
    assert "The-installer-gave-up" in (shot.parent / "screen.txt").read_text()
    assert list(inner_env.iterdir()) == []
