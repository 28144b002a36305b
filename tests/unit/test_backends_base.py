"""One QmpError from both backends when QEMU answers a QMP command with an error:
the qemu backend with a fake QEMU that speaks QMP on its socket, the libvirt backend
with a fake monitor reply."""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest

from pytest_kvm.backends.base import QmpError
from pytest_kvm.backends.libvirt import LibvirtMachine, LibvirtTarget
from pytest_kvm.backends.qemu import QemuMachine
from tests.support.specs import small_spec as spec

NO_PNG = "Enable PNG support with libpng for screendump"
PPM = b"P6\n2 1\n255\n\xff\x00\x00\x00\xff\x00"

# A QEMU that connects to the QMP socket named on its command line, greets, and
# answers like a QEMU built without libpng: screendump with format= is an error,
# without it writes a PPM.
FAKE_QEMU = f"""#!{sys.executable}
import json, socket, sys

path = next(a for a in sys.argv if a.startswith("socket,id=qmp,path=")).split("path=", 1)[1]
sock = socket.socket(socket.AF_UNIX)
sock.connect(path)
out = sock.makefile("w")
greeting = {{"QMP": {{"version": {{"qemu": {{"major": 7, "minor": 2, "micro": 0}},
                                   "package": ""}}, "capabilities": []}}}}
out.write(json.dumps(greeting) + "\\n")
out.flush()
def messages():  # QMP clients need not end a message with a newline
    buf, decoder = "", json.JSONDecoder()
    while chunk := sock.recv(4096):
        buf += chunk.decode()
        while buf.strip():
            try:
                msg, end = decoder.raw_decode(buf.lstrip())
            except ValueError:
                break
            buf = buf.lstrip()[end:]
            yield msg
for msg in messages():
    cmd, args = msg["execute"], msg.get("arguments", {{}})
    reply = {{"return": {{}}}}
    if cmd == "screendump" and "format" in args:
        reply = {{"error": {{"class": "GenericError", "desc": {NO_PNG!r}}}}}
    elif cmd == "screendump":
        open(args["filename"], "wb").write({PPM!r})
    if "id" in msg:
        reply["id"] = msg["id"]
    out.write(json.dumps(reply) + "\\n")
    out.flush()
"""


@pytest.fixture
def machine(tmp_path: Path):
    binary = tmp_path / "fake-qemu"
    binary.write_text(FAKE_QEMU)
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    machine = QemuMachine(spec(tmp_path), binary=str(binary))
    machine.start(connect_timeout=10)
    yield machine
    machine.close()


def test_qemu_backend_error_reply_is_a_qmp_error(machine):
    with pytest.raises(QmpError) as info:
        machine.qmp("screendump", filename=str(machine.spec.workdir / "x"), format="png")
    err = info.value
    assert (err.command, err.error_class, err.desc) == ("screendump", "GenericError", NO_PNG)
    assert str(err) == f"screendump: {NO_PNG}"


def test_qemu_backend_screenshot_falls_back_to_ppm_without_png_support(machine):
    assert machine.screenshot() == PPM
    assert not list(machine.spec.workdir.glob(".screendump-*"))  # the dump is removed


def test_libvirt_backend_error_reply_is_a_qmp_error(tmp_path, monkeypatch):
    pytest.importorskip("libvirt")
    import libvirt_qemu

    reply = {"id": "libvirt-7", "error": {"class": "GenericError", "desc": NO_PNG}}
    sent: list[dict[str, object]] = []

    def monitor(domain, message, flags):
        sent.append(json.loads(message))
        return json.dumps(reply)

    monkeypatch.setattr(libvirt_qemu, "qemuMonitorCommand", monitor)
    machine = LibvirtMachine(spec(tmp_path), LibvirtTarget("qemu:///system"), "tcg")
    monkeypatch.setattr(machine, "is_running", lambda: True)
    with pytest.raises(QmpError) as info:
        machine.qmp("screendump", filename="/x", format="png")
    assert sent == [{"execute": "screendump", "arguments": {"filename": "/x", "format": "png"}}]
    err = info.value
    assert (err.command, err.error_class, err.desc) == ("screendump", "GenericError", NO_PNG)


def test_the_backend_option_names_the_backends_table():
    from pytest_kvm.backends import TABLE
    from pytest_kvm.config import BACKENDS

    assert tuple(TABLE) == BACKENDS
