"""Guests restored from templates (``--kvm-snapshot``, the default): each one its own machine."""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_kvm.guest import Guest
from tests.support.identity import assert_clock_is_hosts
from tests.support.images import sha256
from tests.support.processes import qemu_pids_under


def test_clones_are_distinct_machines(kvm_guest_factory):
    a = kvm_guest_factory()
    b = kvm_guest_factory(hostname="web-1")
    # Both restored from the one template of this shape, not booted.
    assert a.template is not None and a.template == b.template
    assert "restore" in a.boot_timings and "restore" in b.boot_timings
    assert "restored from template" in a.serial_log.read_text(errors="replace")
    # Own host-side ports; own hostnames (the asked-for one, else the guest's name).
    assert a.ssh_port != b.ssh_port
    assert a.succeed("hostname").strip() == a.name
    assert b.succeed("hostname").strip() == "web-1"
    assert b.succeed("cat /etc/hostname").strip() == "web-1"
    # The wall clock is the host's, not the template's.
    for g in (a, b):
        assert_clock_is_hosts(g)
    # The random pool was reseeded (vmgenid), so the clones do not repeat each other.
    assert a.succeed("cat /proc/sys/kernel/random/uuid") != b.succeed(
        "cat /proc/sys/kernel/random/uuid"
    )
    assert a.succeed("head -c 32 /dev/urandom | od -An -tx1") != b.succeed(
        "head -c 32 /dev/urandom | od -An -tx1"
    )
    assert "crng reseeded due to virtual machine fork" in a.succeed("dmesg")
    # The SSH connection is new: the clone has exactly one, ours.
    established = a.succeed("ss -Htn state established '( sport = :22 )'")
    assert len(established.strip().splitlines()) == 1
    # Two clones running at once do not see each other's files.
    a.succeed("echo from-a > /root/mine && sync")
    b.succeed("echo from-b > /root/mine && sync")
    assert a.succeed("cat /root/mine").strip() == "from-a"
    assert b.succeed("cat /root/mine").strip() == "from-b"


# A clone's reboot (its state, host name and identity kept): test_identity.py.


def test_template_files_are_never_written(kvm_guest_factory):
    g = kvm_guest_factory()
    t = g.template
    assert t is not None
    files = (t.disk, t.ram, t.state, t.seed)
    before = {p.name: (p.stat().st_mtime_ns, sha256(p)) for p in files}
    # Write to the disk and dirty lots of RAM in the clone.
    g.succeed("dd if=/dev/urandom of=/root/big bs=1M count=32 status=none && sync")
    g.succeed("head -c 200M /dev/zero | tail -c 1 >/dev/null")
    g.close()
    assert {p.name: (p.stat().st_mtime_ns, sha256(p)) for p in files} == before
    subprocess.run(["qemu-img", "check", "-q", str(t.disk)], check=True)


def test_state_from_one_test_is_invisible_in_the_next(pytester, image_arg, cache_arg, inner_env):
    pytester.makepyfile(
        """
        def test_writes(kvm_guest):
            kvm_guest.succeed("echo leak > /root/leak && sync")
            kvm_guest.succeed("echo leak > /dev/shm/leak")

        def test_reads(kvm_guest):
            kvm_guest.fail("test -e /root/leak")
            kvm_guest.fail("test -e /dev/shm/leak")
        """
    )
    result = pytester.runpytest_subprocess(
        f"--kvm-image={image_arg}", cache_arg, "-p", "no:cacheprovider"
    )
    result.assert_outcomes(passed=2)
    assert list(inner_env.iterdir()) == []
    assert qemu_pids_under(inner_env) == []


# The marker's snapshot=False boots for real: test_artifacts.py's real boot, whose
# progress lines need one anyway.


def test_killed_template_build_leaves_nothing_and_parallel_workers_make_one_and_share_it(
    pytester, kvm_image, inner_env, tmp_path
):
    """SIGKILL the run while it makes a template: the next run makes a whole one, with
    two xdist workers that both need it: made once, by one of them, and shared. (One
    template's boot for both claims: each needs a cache of its own.)"""
    cache = tmp_path / "cache"
    templates = cache / "templates"
    seen = tmp_path / "seen"
    seen.mkdir()
    pytester.makepyfile(
        f"""
        import json, os, pytest

        @pytest.mark.parametrize("n", range(4))
        def test_guest(kvm_guest, n):
            meta = json.loads((kvm_guest.template.dir / "meta.json").read_text())
            worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
            with open({str(seen)!r} + f"/{{worker}}-{{n}}", "w") as out:
                out.write(f"{{kvm_guest.template.name}} {{meta['created']}}")
            kvm_guest.succeed("true")
        """
    )
    args = [f"--kvm-image={kvm_image.path}", f"--kvm-cache={cache}", "-p", "no:cacheprovider"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", *args],
        cwd=pytester.path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTEST_KVM_RUNTIME_DIR": str(inner_env)},
    )
    try:
        # Wait until the template guest is running and writing its RAM file.
        deadline = time.monotonic() + 120
        while not any(p.stat().st_blocks for p in templates.glob(".*.building-*/ram")):
            assert proc.poll() is None, "the run ended before it made a template"
            assert time.monotonic() < deadline, "no template build started"
            time.sleep(0.2)
        time.sleep(3)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        # What reaping a dead run will do: its socket directory under /tmp (used when
        # the runtime dir's path is too long for UNIX sockets) has the run's prefix.
        for run_dir in inner_env.glob("pytest-kvm-*"):
            prefix = "-".join(run_dir.name.split("-")[:3])
            for sock_dir in Path("/tmp").glob(f"{prefix}-*"):
                shutil.rmtree(sock_dir, ignore_errors=True)
            shutil.rmtree(run_dir, ignore_errors=True)
    # QEMU dies with its parent; nothing complete is left.
    deadline = time.monotonic() + 10
    while qemu_pids_under(templates) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert qemu_pids_under(templates) == []
    assert list(templates.glob("*/meta.json")) == []
    assert [p for p in templates.iterdir() if not p.name.startswith(".")] == []
    assert list(seen.iterdir()) == []  # the killed run never got a guest
    # The next run makes the template from scratch: two workers, one template made
    # once (one creation time), used by both.
    result = pytester.runpytest_subprocess(*args, "-n", "2")
    result.assert_outcomes(passed=4)
    records = {p.name: p.read_text() for p in seen.iterdir()}
    workers = {name.split("-")[0] for name in records}
    assert workers == {"gw0", "gw1"}, records
    assert len(set(records.values())) == 1, records
    assert len(list(templates.glob("*/meta.json"))) == 1
    assert list(templates.glob(".*.building-*")) == []


@pytest.mark.kvm(kernel_args="pytest_kvm.marker=42 quiet")
def test_kernel_args_boot_the_images_kernel_for_real(kvm_guest):
    g = kvm_guest
    assert g.template is None and "restore" not in g.boot_timings
    cmdline = g.succeed("cat /proc/cmdline").split()
    assert "pytest_kvm.marker=42" in cmdline and "quiet" in cmdline
    # The image's own command line is kept: root file system and serial console.
    assert any(arg.startswith("root=") for arg in cmdline)
    assert "console=ttyS0,115200n8" in cmdline


def test_clone_of_a_template_without_guest_agent_is_made_its_own_over_ssh(kvm_guest_factory):
    g = kvm_guest_factory()
    assert g.template is not None and g.template.agent  # the catalog image has qemu-ga
    # As for an image without qemu-ga: clock and hostname go over SSH instead.
    template = dataclasses.replace(g.template, agent=False)
    config = dataclasses.replace(g.config, hostname="over-ssh")
    with Guest(g._run, config, template=template) as clone:
        # A MAC of its own too, set by the script over SSH (the session outlived it).
        assert clone.mac not in (template.mac, g.mac)
        assert f"link/ether {clone.mac} " in clone.succeed("ip -o link")
        assert clone.succeed("hostname").strip() == "over-ssh"
        assert clone.succeed("cat /etc/hostname").strip() == "over-ssh"
        assert_clock_is_hosts(clone)


def test_what_systemd_gave_up_on_in_a_slow_boot_starts_before_the_save(
    kvm_guest_factory, monkeypatch
):
    # Under load, a template's boot once timed out waiting for /dev/ttyS0: its serial
    # getty never ran, and every clone of that cached template had no login prompt.
    # The repair that runs before a template is saved, on a real guest in that state
    # (the journal line is what systemd logged then).
    from pytest_kvm import template

    g = kvm_guest_factory()
    g.succeed("systemctl stop serial-getty@ttyS0.service")
    assert g.run("systemctl is-active serial-getty@ttyS0.service").stdout.strip() != "active"
    line = '{"UNIT": "serial-getty@ttyS0.service", "MESSAGE": "Dependency failed for it."}'
    monkeypatch.setattr(template, "PID1_LOG", f"echo {shlex.quote(line)}")
    said: list[str] = []
    g.console.skip_to_end()
    template.repair_slow_boot(g, "t", 120, said.append)
    assert g.succeed("systemctl is-active serial-getty@ttyS0.service").strip() == "active"
    g.wait_for_console(r"login:", timeout=60)
    assert "serial-getty@ttyS0.service" in said[0]
    assert len(said) == 1  # it started
