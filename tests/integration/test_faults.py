"""Guest faults, as a test meets them: a kernel panic, sshd or the network gone, a guest
that never becomes ready, a full disk in the guest or on the host. Each fault gives a
clear error, and the next guest (or the next test) is unaffected."""

from __future__ import annotations

import shlex
import subprocess

import pytest

from pytest_kvm.errors import GuestError, GuestTimeout
from tests.support.processes import qemu_pids_under


@pytest.fixture
def inner_run(pytester, image_arg, cache_arg):
    """Run ``source`` as a test file in a pytest subprocess using this run's cache."""

    def run(source: str, *args: str):
        pytester.makepyfile(source)
        return pytester.runpytest_subprocess(
            f"--kvm-image={image_arg}", cache_arg, f"--kvm-artifacts={pytester.path / 'arts'}",
            "-p", "no:cacheprovider", *args,
        )  # fmt: skip

    return run


def assert_next_guest_works(factory) -> None:
    other = factory()
    assert other.succeed("echo fine").strip() == "fine"


def test_kernel_panic_is_guest_crashed_with_the_panic_and_the_next_test_passes(
    inner_run, inner_env
):
    result = inner_run(
        """
        def test_panics(kvm_guest):
            kvm_guest.run("echo c > /proc/sysrq-trigger", timeout=60)

        def test_next(kvm_guest):
            assert kvm_guest.succeed("echo fine").strip() == "fine"
        """
    )
    result.assert_outcomes(failed=1, passed=1)
    out = result.stdout.str()
    # GuestCrashed, not a GuestTimeout after the command's 180 s: the panic was seen
    # on the console while the command ran.
    assert "pytest_kvm.errors.GuestCrashed: guest 'kvm-" in out
    assert "panicked: Kernel panic - not syncing: sysrq triggered crash" in out
    assert "command 'echo c > /proc/sysrq-trigger' was running" in out
    assert "GuestTimeout" not in out
    # The error shows the console from the crash's cause on, not only the trace's end.
    shown = out.split("was running; console:", 1)[1]
    assert "Call Trace:" in shown
    before_trace = shown.split("Call Trace:", 1)[0]
    assert "sysrq: Trigger a crash" in before_trace and "Kernel panic" in before_trace
    assert list(inner_env.iterdir()) == []
    assert qemu_pids_under(inner_env) == []


def test_sshd_killed_commands_fail_clearly_and_the_console_still_works(kvm_guest_factory):
    g = kvm_guest_factory()
    # sshd goes away under the running command (stopping the service alone leaves
    # open sessions running): an error, not a made-up exit status.
    with pytest.raises(GuestError) as info:
        g.run("systemctl stop ssh.service; kill $(pidof sshd); sleep 60", timeout=60)
    assert type(info.value) is GuestError
    message = str(info.value)
    assert f"guest {g.name!r}" in message
    assert "the SSH connection was lost while the command ran" in message
    assert "the console is still reachable as guest.console" in message
    # The next command waits for SSH to come back, no longer than its own timeout,
    # and says what it last saw.
    with pytest.raises(GuestTimeout) as info:
        g.run("true", timeout=5)
    message = str(info.value)
    assert "command 'true': the SSH connection was lost" in message
    assert "SSH did not answer again within 15 s" in message
    assert f"SSH to 127.0.0.1:{g.ssh_port} not ready: " in message
    assert "no attempt made" not in message and "last console lines:" in message
    # The serial console still answers: a new login prompt for a new line.
    g.console.skip_to_end()
    g.console.send("\n")
    g.wait_for_console(r"login:", timeout=60)
    assert g.is_running
    assert_next_guest_works(kvm_guest_factory)


def test_guest_network_down_commands_fail_clearly_and_the_console_still_works(
    kvm_guest_factory,
):
    g = kvm_guest_factory()
    dev = g.succeed("ip -o -4 route show default | awk '{print $5}'").strip()
    assert dev
    # From a service of its own, a second after this command has returned. The
    # marker is computed by the guest's shell: systemd may print the unit's command
    # line on the console (it logs to kmsg while journald restarts, as it does in a
    # fresh clone), and a literal marker there would match before the link is down.
    down = (
        f"sleep 1; ip link set dev {shlex.quote(dev)} down"
        " && echo pytest-kvm-net-down-$((6 * 7)) >/dev/ttyS0"
    )
    g.succeed(f"systemd-run --no-block --quiet sh -c {shlex.quote(down)}")
    g.wait_for_console("pytest-kvm-net-down-42", timeout=60)
    with pytest.raises(GuestError) as info:
        g.run("true", timeout=5)
    message = str(info.value)
    assert f"guest {g.name!r}" in message and "command 'true'" in message
    assert "SSH failed" in message or "SSH did not answer" in message
    assert "the console is still reachable as guest.console" in message
    g.console.skip_to_end()
    g.console.send("\n")
    g.wait_for_console(r"login:", timeout=60)
    assert g.is_running
    assert_next_guest_works(kvm_guest_factory)


# Fill the root file system without writing its data (fallocate): big pieces, then
# smaller ones until not even a block is left.
FILL = """
i=0
for size in 64M 4M 256K 16K 4K; do
  while fallocate -l "$size" "/var/tmp/pytest-kvm-fill.$i" 2>/dev/null; do i=$((i + 1)); done
done
sync
"""


def test_guest_disk_full_fails_writes_clearly_and_ssh_keeps_working(kvm_guest_factory):
    g = kvm_guest_factory()
    g.succeed(FILL, timeout=300)
    assert int(g.succeed("stat -f -c %a /").strip()) == 0  # no block left for anyone
    err = g.fail("echo data > /root/new-file")
    assert "No space left on device" in err
    with pytest.raises(GuestError, match=r"failed \(exit \d+\): .*No space left on device"):
        g.succeed("cp /etc/os-release /root/copy")
    # SSH still works on a full disk, on this connection and on a new one.
    g.reconnect()
    assert g.succeed("echo still-here").strip() == "still-here"
    g.succeed("rm -f /var/tmp/pytest-kvm-fill.*")
    g.succeed("echo data > /root/new-file && sync")
    assert_next_guest_works(kvm_guest_factory)


def test_guest_that_never_gets_ready_says_what_it_last_saw_and_the_next_test_passes(
    inner_run, inner_env
):
    # sshd masked: a real boot (kernel_args) that comes up without SSH.
    result = inner_run(
        """
        import pytest

        @pytest.mark.kvm(kernel_args="systemd.mask=ssh.service")
        def test_boot(kvm_guest):
            pass

        def test_next(kvm_guest):
            assert kvm_guest.succeed("echo fine").strip() == "fine"
        """,
        "--kvm-boot-timeout=20",
    )
    result.assert_outcomes(passed=1, errors=1)
    out = result.stdout.str()
    assert "pytest_kvm.errors.GuestTimeout: guest 'kvm-" in out
    assert "not SSH-ready after 60 s (SSH to 127.0.0.1:" in out
    seen = out.split("not SSH-ready after 60 s (SSH to 127.0.0.1:", 1)[1]
    assert " not ready: " in seen.splitlines()[0]
    assert "no attempt made" not in seen.splitlines()[0]
    assert "last console lines:" in seen
    assert list(inner_env.iterdir()) == []
    assert qemu_pids_under(inner_env) == []


def test_host_disk_too_full_for_an_overlay_is_a_clear_error_before_boot(
    inner_run, tmp_path, monkeypatch
):
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=80M,mode=0700", "tmpfs", str(small)],
                   check=True)  # fmt: skip
    try:
        monkeypatch.setenv("PYTEST_KVM_RUNTIME_DIR", str(small))
        result = inner_run(
            """
            import os
            from pathlib import Path

            def test_full(kvm_guest_factory):
                # Leave about 40 MiB free on the runtime dir: less than a guest needs.
                ballast = Path(os.environ["PYTEST_KVM_RUNTIME_DIR"]) / "ballast"
                ballast.write_bytes(b"x" * (40 << 20))
                try:
                    kvm_guest_factory()
                finally:
                    ballast.unlink()

            def test_next(kvm_guest):
                assert kvm_guest.succeed("echo fine").strip() == "fine"
            """
        )
        result.assert_outcomes(failed=1, passed=1)
        out = result.stdout.str()
        assert "pytest_kvm.errors.HostDiskFull: cannot make overlay" in out
        assert f"MiB free in '{small}/pytest-kvm-" in out
        assert "needs at least 64 MiB" in out
        # Refused before QEMU started: no console log, nothing launched.
        assert "GuestLaunchError" not in out and "kvm console tail" not in out
        assert list(small.iterdir()) == []
        assert qemu_pids_under(small) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)
