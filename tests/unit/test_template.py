"""Template keys and checks, without QEMU guests (qemu-img makes the one real disk)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import types
from pathlib import Path

import pytest

from pytest_kvm import template
from pytest_kvm.accel import AccelChoice
from pytest_kvm.images import Image
from pytest_kvm.run import RunContext
from pytest_kvm.template import Shape, TemplateStore, template_key
from tests.support.templates import KEY, base_image, make_template


@pytest.fixture
def image(tmp_path: Path) -> Image:
    return base_image(tmp_path)


def test_key_follows_everything_that_shapes_a_template(image, tmp_path):
    base = template_key(image, Shape(1024, 2), "tcg", "QEMU 7.2")
    assert base == template_key(image, Shape(1024, 2), "tcg", "QEMU 7.2")
    others = {
        template_key(image, Shape(2048, 2), "tcg", "QEMU 7.2"),
        template_key(image, Shape(1024, 1), "tcg", "QEMU 7.2"),
        template_key(image, Shape(1024, 2, kernel_args="quiet"), "tcg", "QEMU 7.2"),
        template_key(image, Shape(1024, 2), "kvm", "QEMU 7.2"),
        template_key(image, Shape(1024, 2), "tcg", "QEMU 8.2"),
        template_key(image, Shape(1024, 2, display=True), "tcg", "QEMU 7.2"),  # --kvm-vnc
        # libvirt save images, per hypervisor host and versions there
        template_key(image, Shape(1024, 2), "tcg", "QEMU 7.2", {"backend": "libvirt", "host": "a"}),
        template_key(image, Shape(1024, 2), "tcg", "QEMU 7.2", {"backend": "libvirt", "host": "b"}),
    }
    assert base not in others and len(others) == 8
    # The qemu backend's identity ({}) leaves its keys as they were.
    assert template_key(image, Shape(1024, 2), "tcg", "QEMU 7.2", {}) == base
    assert Shape(1024, 2, display=True).label().endswith("-vga")
    # Without a display the key is what it was before that field existed.
    assert "display" not in Shape(1024, 2).key_fields()
    # A rewritten base image (new mtime) is a different template.
    os.utime(image.path, ns=(1, 1))
    assert template_key(image, Shape(1024, 2), "tcg", "QEMU 7.2") != base


def test_a_template_whose_state_holds_its_ram_passes_its_check(image, tmp_path):
    """A libvirt template has no RAM file: its save image holds the RAM."""
    work = make_template(tmp_path / "templates", image)
    key = json.loads((work / "meta.json").read_text())["key"]
    (work / "ram").unlink()
    TemplateStore._write_meta(work, key, image, Shape(1024, 2), "02:6b:76:00:00:01", True)
    assert json.loads((work / "meta.json").read_text())["ram"] is False
    assert TemplateStore._problem(work, key) == ""


def test_a_complete_template_passes_its_check(image, tmp_path):
    work = make_template(tmp_path, image)
    assert TemplateStore._problem(work, KEY) == ""
    assert "other settings" in TemplateStore._problem(work, "f" * 16)


def flip_byte_keep_mtime(path: Path) -> None:
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda w: (w / "ram").unlink(), "incomplete (ram is missing)"),
        (lambda w: (w / "meta.json").unlink(), "incomplete (meta.json is missing)"),
        (lambda w: (w / "state").write_bytes(b"short"), "changed state"),
        (lambda w: flip_byte_keep_mtime(w / "state"), "corrupt saved state"),
        (lambda w: (w / "disk.qcow2").write_bytes(b"x" * 512), "changed disk.qcow2"),
        (lambda w: (w / "meta.json").write_text("{"), "cannot be read"),
    ],
)
def test_a_damaged_template_is_never_trusted(image, tmp_path, damage, problem):
    work = make_template(tmp_path, image)
    damage(work)
    assert problem in TemplateStore._problem(work, KEY)


def test_a_damaged_disk_with_the_recorded_size_and_mtime_fails_qemu_img_check(image, tmp_path):
    work = make_template(tmp_path, image)
    disk = work / "disk.qcow2"
    st = disk.stat()
    data = bytearray(disk.read_bytes())
    data[0:4] = b"XXXX"  # no longer a qcow2 header
    disk.write_bytes(bytes(data))
    os.utime(disk, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert "damaged disk" in TemplateStore._problem(work, KEY)


def test_loading_a_damaged_template_removes_it(image, tmp_path):
    work = make_template(tmp_path, image)
    (work / "state").write_bytes(b"")
    messages: list[str] = []
    run = RunContext(AccelChoice("tcg", "test"))
    try:
        store = TemplateStore(tmp_path, run, messages.append)
        assert store._load(work, KEY, image, Shape(1024, 2)) is None
    finally:
        run.close()
    assert not work.exists()
    assert "making it again" in messages[0] and "changed state" in messages[0]


def test_meta_records_the_clone_facts(image, tmp_path):
    work = make_template(tmp_path, image)
    meta = json.loads((work / "meta.json").read_text())
    assert meta["mac"] == "02:6b:76:00:00:01" and meta["key"] == KEY and meta["agent"] is True
    assert meta["shape"] == dataclasses.asdict(Shape(1024, 2))
    assert set(meta["files"]) == {"disk.qcow2", "ram", "state", "seed.iso", "id_ed25519",
                                  "host_ed25519"}  # fmt: skip


@pytest.mark.parametrize("holds", [True, False, None])
def test_whether_sshd_holds_its_keys_is_loaded_from_the_meta(image, tmp_path, holds):
    """Recorded at the build (``saved_facts``), so that clones need not ask the guest;
    a template made before it was recorded says None (clones ask)."""
    extra = {} if holds is None else {"sshd_holds_keys": holds}
    work = make_template(tmp_path, image, extra=extra)
    run = RunContext(AccelChoice("tcg", "test"))
    try:
        template = TemplateStore(tmp_path, run, print)._load(work, KEY, image, Shape(1024, 2))
    finally:
        run.close()
    assert template is not None and template.sshd_holds_keys is holds


def test_prune_removes_stale_and_half_made_templates_only(image, tmp_path):
    from filelock import FileLock

    from pytest_kvm.template import prune, stale_reason

    root = tmp_path / "templates"
    fresh = make_template(root, image)
    assert stale_reason(fresh) == ""
    half = root / ".base-1024M-2cpu-user-0123.building-99999"
    half.mkdir()
    assert prune(root).removed == [(half, "half made")]
    assert fresh.exists()
    # The base image is rewritten: the template can never be used again.
    os.utime(image.path, ns=(1, 1))
    assert "changed" in stale_reason(fresh)
    # Not while another process holds its lock (building or checking it).
    held = FileLock(str(root / f".{fresh.name}.lock"))
    held.acquire()
    try:
        result = prune(root)
        assert result.removed == []
        assert result.in_use == [(fresh, "being made or checked by another process")]
    finally:
        held.release()
    assert [p.name for p, _ in prune(root).removed] == [fresh.name] and not fresh.exists()


def test_prune_all_and_a_missing_base(image, tmp_path):
    from pytest_kvm.template import prune, stale_reason

    fresh = make_template(tmp_path / "templates", image)
    other = make_template(tmp_path / "other", image)
    image.path.unlink()
    assert "is gone" in stale_reason(fresh)
    assert prune(tmp_path / "other", everything=True).removed == [(other, "removed on request")]


# What a test run does with a template: get it (its first clone), use it, end.
USER = """
import sys
from pathlib import Path

from pytest_kvm import template
from pytest_kvm.accel import AccelChoice
from pytest_kvm.images import Image
from pytest_kvm.run import RunContext
from pytest_kvm.template import Shape, TemplateStore

def no_build(*args):
    raise SystemExit("the template was not found: this test would boot a guest")

TemplateStore._build = no_build
root, path = Path(sys.argv[1]), Path(sys.argv[2])
run = RunContext(AccelChoice("tcg", "test"))
store = TemplateStore(root, run)
print(store.get(Image("base", path, "qcow2", str(path)), Shape(1024, 2), 60).name, flush=True)
sys.stdin.read()  # clones from it until told that the run is over
store.close()
run.close()
"""


def test_prune_leaves_a_template_that_a_live_run_clones_from(image, tmp_path, capsys):
    import sys

    from pytest_kvm import cli
    from pytest_kvm.template import prune, qemu_version

    root = tmp_path / "templates"
    shape = Shape(1024, 2)
    key = template_key(image, shape, "tcg", qemu_version())
    used = make_template(root, image, name=f"base-{shape.label()}-{key}", key=key)
    run = subprocess.Popen(
        [sys.executable, "-c", USER, str(root), str(image.path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert run.stdout is not None and run.stdout.readline().strip() == used.name
        result = prune(root, everything=True)
        assert result.removed == [] and used.exists()
        assert result.in_use == [(used, "in use by a running test session")]
        assert (
            cli.main(["--cache", str(tmp_path), "template", "prune", "--all", "--no-libvirt"]) == 0
        )
        out = capsys.readouterr().out
        assert f"kept {used}: in use by a running test session" in out and used.exists()
    finally:
        run.communicate(timeout=60)  # its stdin closes: the run ends
    assert run.returncode == 0
    # No run uses it any more: it goes.
    assert prune(root, everything=True).removed == [(used, "removed on request")]
    assert not used.exists()


class _ScriptedGuest:
    """What repair_slow_boot sees of a guest: its init system and command results."""

    def __init__(self, pid1_log: str, init: str = "systemd") -> None:
        self.init_system = init
        self.pid1_log = pid1_log
        self.commands: list[str] = []

    def run(self, cmd, timeout=60):
        self.commands.append(cmd)
        out = self.pid1_log if cmd == template.PID1_LOG else ""
        return types.SimpleNamespace(stdout=out, exit_status=0)


def _entry(unit: str, message: str) -> str:
    return json.dumps({"UNIT": unit, "MESSAGE": message})


SLOW_BOOT_LOG = "\n".join(
    [
        _entry("ssh.service", "Started ssh.service - OpenBSD Secure Shell server."),
        "not json",
        _entry("dev-ttyS0.device", "Timed out waiting for device dev-ttyS0.device - /dev/ttyS0."),
        _entry("serial-getty@ttyS0.service", "Dependency failed for serial-getty@ttyS0.service."),
        json.dumps({"MESSAGE": [1, 2]}),
    ]
)


@pytest.mark.parametrize(
    ("log", "units"),
    [
        (_entry("ssh.service", "Started ssh.service."), []),
        (SLOW_BOOT_LOG, ["serial-getty@ttyS0.service"]),
    ],
)
def test_a_template_boot_that_systemd_gave_up_on_is_repaired_before_the_save(log, units):
    guest = _ScriptedGuest(log)
    said: list[str] = []
    template.repair_slow_boot(guest, "t", 60, said.append)  # type: ignore[arg-type]
    starts = [c for c in guest.commands if "systemctl start" in c]
    if units:
        assert starts == ["systemctl reset-failed; systemctl start -- serial-getty@ttyS0.service"]
        assert "serial-getty@ttyS0.service" in said[0]
    else:
        assert starts == [] and said == []


def test_a_guest_without_systemd_is_left_as_it_is():
    guest = _ScriptedGuest("Timed out waiting for device", init="init")
    template.repair_slow_boot(guest, "t", 60, print)  # type: ignore[arg-type]
    assert guest.commands == []


def test_threads_of_one_process_make_a_template_once_and_say_no_wait(image, tmp_path):
    """Guests started at once in threads (three clones of one test) wait for each
    other's build in-process: one build, and no "waiting for another process"."""
    import threading
    import time

    work = make_template(tmp_path / "made", image)
    messages: list[str] = []
    builds: list[int] = []
    run = RunContext(AccelChoice("tcg", "test"))
    try:
        store = TemplateStore(tmp_path / "templates", run, messages.append)

        def build():
            builds.append(1)
            time.sleep(0.3)
            return store._load(work, KEY, image, Shape(1024, 2))

        got = []
        threads = [
            threading.Thread(target=lambda: got.append(store.obtain("t", KEY, lambda: None, build)))
            for _ in range(3)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        store.close()
    finally:
        run.close()
    assert len(builds) == 1 and len(got) == 3 and len({id(t) for t in got}) == 1
    assert not [m for m in messages if "another process" in m]
