"""A real guest per test: the Guest API as a user exercises it."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import threading
import time
from pathlib import Path

import pytest

from pytest_kvm.errors import CommandFailed, GuestCrashed, GuestTimeout
from tests.support.images import sha256
from tests.support.processes import child_exit_code, qemu_pids_under


def test_commands_files_and_console(kvm_guest, tmp_path: Path):
    g = kvm_guest
    # run: exit status and both streams, separately.
    r = g.run("echo out; echo err >&2; exit 3")
    assert (r.exit_status, r.stdout, r.stderr) == (3, "out\n", "err\n")
    # succeed / fail, and a failure message a person can act on.
    assert g.succeed("uname -s").strip() == "Linux"
    assert "No such file" in g.fail("ls /nonexistent")
    with pytest.raises(CommandFailed) as info:
        g.succeed("systemctl is-active no-such-unit.service")
    message = str(info.value)
    assert message.startswith(f"guest {g.name!r} ({g.image.name}): command ")
    assert "failed (exit" in message and info.value.exit_status != 0
    with pytest.raises(CommandFailed, match="expected to fail"):
        g.fail("true")
    # It is the guest we asked for: root, the hostname is the guest's name, our MAC.
    assert g.succeed("id -u").strip() == "0"
    assert g.succeed("hostname").strip() == g.name
    assert g.mac in g.succeed("ip -o link")
    # waits
    g.wait_for_unit("ssh.service")
    g.wait_for_port(22)
    assert g.wait_until_succeeds("test -e /etc/os-release && echo there").strip() == "there"
    with pytest.raises(GuestTimeout, match=r"never succeeded .*last exit 1"):
        g.wait_until_succeeds("false", timeout=1)
    g.run("systemd-run --unit=pytest-kvm-fails --service-type=oneshot false")
    with pytest.raises(CommandFailed, match=r"unit 'pytest-kvm-fails.service' failed"):
        g.wait_for_unit("pytest-kvm-fails.service", timeout=30)
    # command timeout says what it saw
    with pytest.raises(GuestTimeout, match="did not finish"):
        g.run("echo started; sleep 30", timeout=0.5)
    # put/get with a hostile file name, quoted everywhere
    name = "a file 'with' \"quotes\"; $(touch PWNED) `touch PWNED`"
    local = tmp_path / "source.txt"
    local.write_text("payload\n" * 100)
    remote = f"/tmp/{name}"
    g.put(local, remote)
    assert g.succeed(f"sha256sum {shlex.quote(remote)}").split()[0] == sha256(local)
    assert g.succeed("find / -xdev -name PWNED") == ""
    back = g.get(remote, tmp_path / "back.txt")
    assert back.read_text() == local.read_text()
    # serial console: logged from power-on, and expect works on it
    log = g.serial_log.read_text(errors="replace")
    assert "Linux version" in log
    m = g.wait_for_console(r"(\S+) login:", timeout=60)
    assert m.group(1)
    g.console.skip_to_end()
    g.succeed("echo pytest-kvm-marker-42 > /dev/ttyS0")
    g.console.expect("pytest-kvm-marker-42", timeout=30)
    # timings
    if g.template is None:
        assert {"overlay", "seed", "qemu_start", "ssh_ready", "total"} <= set(g.boot_timings)
    else:
        assert {"overlay", "restore", "ssh_ready", "adopt", "total"} <= set(g.boot_timings)
    assert all(v >= 0 for v in g.boot_timings.values())


def test_ssh_command_works_with_openssh_and_pins_the_host_key(kvm_guest, tmp_path: Path):
    g = kvm_guest
    argv = [*shlex.split(g.ssh_command), "-o", "BatchMode=yes", "cat /etc/hostname"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == g.name
    # The same port with a different pinned key is refused: no silent trust.
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"[127.0.0.1]:{g.ssh_port} ssh-ed25519 {'A' * 68}\n")
    line = g.ssh_command.replace(str(g.known_hosts), str(wrong))
    bad = subprocess.run(
        [*shlex.split(line), "-o", "BatchMode=yes", "true"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode != 0
    # Private key and known_hosts are private to the user.
    key = Path(re.search(r"-i (\S+)", g.ssh_command).group(1))
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    assert oct(key.parent.stat().st_mode & 0o777) == "0o700"


def test_factory_guests_are_separate_and_leave_nothing(kvm_guest_factory, kvm_image):
    base_hash = sha256(kvm_image.path)
    # Two clones of one template (a guest's memory= and cpus= from the factory: the
    # bridge guests of test_network.py, whose shape is not the default one; a shape
    # of its own here would cost a template's boot).
    a = kvm_guest_factory(name="a")
    b = kvm_guest_factory(name="b")
    assert a.template is not None and a.template == b.template
    assert a.name != b.name and a.mac != b.mac and a.ssh_port != b.ssh_port
    a.succeed("echo only-in-a > /root/mark && sync")
    b.fail("test -e /root/mark")
    # kill: the guest is gone, and a command says so instead of hanging.
    workdir = a.workdir
    b.kill()
    with pytest.raises(GuestCrashed, match="QEMU exited"):
        b.succeed("true")
    a.close()
    a.close()  # idempotent
    assert not workdir.exists()
    assert qemu_pids_under(workdir) == []
    assert not a.is_running
    b.close()
    # The base image was never written.
    assert sha256(kvm_image.path) == base_hash


@pytest.fixture
def pytester_guest_run(pytester, image_arg, cache_arg, inner_env):
    def run(source: str, *args: str):
        pytester.makepyfile(source)
        result = pytester.runpytest_subprocess(
            f"--kvm-image={image_arg}",
            cache_arg,
            f"--kvm-artifacts={pytester.path / 'arts'}",
            *args,
        )
        return result

    return run


def test_failed_test_report_shows_console_and_leaves_nothing(
    pytester_guest_run, inner_env, pytester
):
    result = pytester_guest_run(
        """
        def test_fails(kvm_guest):
            kvm_guest.succeed("echo checking-hostname > /dev/console")
            assert kvm_guest.succeed("cat /etc/hostname").strip() == "not-this"
        """
    )
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "kvm console tail: kvm-" in out
    assert "checking-hostname" in out.split("kvm console tail: kvm-", 1)[1]
    assert "kvm artifacts: " in out
    saved = list((pytester.path / "arts").rglob("serial.log"))
    assert len(saved) == 1 and "Linux version" in saved[0].read_text(errors="replace")
    # Nothing left: no run dir, no qemu.
    assert list(inner_env.iterdir()) == []
    assert qemu_pids_under(inner_env) == []


def test_guest_that_never_gets_ready_times_out_saying_what_it_saw(pytester_guest_run, inner_env):
    result = pytester_guest_run(
        """
        def test_boot(kvm_guest):
            pass
        """,
        "--kvm-boot-timeout=1",
        "--kvm-no-snapshot",
    )
    result.assert_outcomes(errors=1)
    out = result.stdout.str()
    assert "GuestTimeout" in out and "not SSH-ready after 3 s" in out
    assert "last console lines" in out
    assert list(inner_env.iterdir()) == []
    assert qemu_pids_under(inner_env) == []


def test_template_that_never_gets_ready_times_out_and_leaves_no_template(
    pytester, kvm_image, inner_env, tmp_path
):
    cache = tmp_path / "cache"
    pytester.makepyfile(
        """
        def test_boot(kvm_guest):
            pass
        """
    )
    result = pytester.runpytest_subprocess(
        f"--kvm-image={kvm_image.path}", f"--kvm-cache={cache}", "--kvm-boot-timeout=1"
    )
    result.assert_outcomes(errors=1)
    out = result.stdout.str()
    assert "making template" in out and "not SSH-ready after 3 s" in out
    templates = cache / "templates"
    assert [p.name for p in templates.iterdir() if not p.name.endswith(".lock")] == []
    assert list(inner_env.iterdir()) == []
    assert qemu_pids_under(inner_env) == []


def test_console_only_guest_with_a_bigger_disk(kvm_guest_factory):
    g = kvm_guest_factory(ssh=False, disk_size="4G")
    # No SSH wait: the test drives the console itself.
    assert "ssh_ready" not in g.boot_timings
    with pytest.raises(Exception, match="no SSH connection"):
        g.run("true")
    g.wait_for_console(r"login:", timeout=300)
    info = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(g.workdir / "disk.qcow2")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert '"virtual-size": 4294967296' in info
    g.shutdown(timeout=60)  # ACPI power button, handled by systemd-logind
    assert not g.is_running
    assert "reboot: Power down" in g.serial_log.read_text(errors="replace")


def test_guest_started_from_a_thread_outlives_the_thread(kvm_guest_factory):
    """QEMU's parent-death signal follows the thread that forked it: a guest started
    from a short-lived thread (a test's pool) must not die when that thread ends."""
    started = []
    worker = threading.Thread(target=lambda: started.append(kvm_guest_factory()))
    worker.start()
    worker.join()
    time.sleep(1)
    guest = started[0]
    assert guest.is_running
    assert guest.succeed("echo alive").strip() == "alive"


def test_a_child_made_by_fork_starts_a_guest_of_its_own(kvm_guest_factory):
    """Every QEMU is forked by one spawner thread, which a child made by ``os.fork``
    does not have: the child gets its own, and starts, uses and ends a real guest
    while the parent's goes on. The child reports by exit code only."""
    parent = kvm_guest_factory()  # the parent's spawner thread and template, in use
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 3
        try:
            child = kvm_guest_factory()
            code = 0 if child.succeed("echo from-child").strip() == "from-child" else 4
            workdir = child.workdir
            child.close()
            if workdir.exists() or qemu_pids_under(workdir):
                code = 5
        except BaseException:
            code = 6
        os._exit(code)
    code = child_exit_code(pid, 300, poll=0.2)
    assert code is not None, "a guest started in a forked child did not finish in 300 s"
    assert code == 0
    assert parent.succeed("echo parent-still-here").strip() == "parent-still-here"


def test_sshd_refuses_passwords_and_cloud_init_never_restarted_it(kvm_guest):
    """Password log-ins are off from sshd's first start (a drop-in from the seed), so
    cloud-init has no reason to restart sshd while tests connect."""
    assert "passwordauthentication no" in kvm_guest.succeed("sshd -T").lower().splitlines()
    kvm_guest.succeed("cloud-init status --wait >/dev/null")
    log = kvm_guest.succeed("journalctl -b -u ssh.service --no-pager -o cat")
    assert "Started ssh.service" in log or "Started OpenBSD" in log
    assert "Stopping" not in log and "Stopped" not in log
