"""Commands' output and SFTP transfers over a real guest's SSH connection: every byte
of stdout and stderr arrives, and a guest that panics mid-transfer is an error within
seconds, not a wait without end."""

from __future__ import annotations

import concurrent.futures
import os
import random
import shlex
import threading
import time

import pytest

from pytest_kvm.errors import GuestCrashed

# Under TCG a command costs ~0.1-0.9 s and SSH moves ~1-4 MB/s on a busy 2-core host:
# 2000 commands (~150 MB) take many minutes, so the default keeps the CI budget (the
# loop of old lost output in 23 of 100). PYTEST_KVM_SSH_IO_COMMANDS=2000 runs them all.
COMMANDS = int(os.environ.get("PYTEST_KVM_SSH_IO_COMMANDS", "64"))
LARGEST = 1 << 20
FILLER = "abcdefghijklmnopqrstuvwxyz" * 3
BLOCK = 40  # records per run on one stream before the command switches to the other

# Writes exactly `left` bytes: numbered records, `block` of them to stdout, the next
# `block` to stderr, and so on; the last record cut to fit. One mawk per command.
GENERATOR = r"""BEGIN {
  for (k = 0; left > 0; k++) {
    r = sprintf("%d.%d:%s\n", id, k, filler)
    if (length(r) > left) r = substr(r, 1, left)
    left -= length(r)
    if (int(k / block) % 2) printf "%s", r > "/dev/stderr"; else printf "%s", r
  }
}"""


def expected(ident: int, size: int) -> tuple[str, str]:
    out: list[str] = []
    err: list[str] = []
    left, k = size, 0
    while left > 0:
        record = f"{ident}.{k}:{FILLER}\n"[:left]
        left -= len(record)
        (err if (k // BLOCK) % 2 else out).append(record)
        k += 1
    return "".join(out), "".join(err)


def command(ident: int, size: int) -> str:
    return f"awk -v id={ident} -v left={size} -v block={BLOCK} -v filler={FILLER} " + shlex.quote(
        GENERATOR
    )


def test_every_byte_of_many_commands_output_arrives(kvm_guest):
    # Sizes log-spread from 1 byte to 1 MiB, run four at a time over the one SSH
    # connection (a channel each), large and small mixed.
    sizes = [round(LARGEST ** (i / (COMMANDS - 1))) for i in range(COMMANDS)]
    assert (sizes[0], sizes[-1]) == (1, LARGEST)
    order = list(enumerate(sizes))
    random.Random(18).shuffle(order)

    def check(item: tuple[int, int]) -> str:
        ident, size = item
        result = kvm_guest.run(command(ident, size), timeout=120)
        want_out, want_err = expected(ident, size)
        if (result.exit_status, result.stdout, result.stderr) == (0, want_out, want_err):
            return ""
        return (
            f"command {ident} ({size} bytes): exit {result.exit_status}, stdout "
            f"{len(result.stdout)}/{len(want_out)} bytes, stderr "
            f"{len(result.stderr)}/{len(want_err)} bytes, stderr tail {result.stderr[-200:]!r}"
        )

    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        wrong = [problem for problem in pool.map(check, order) if problem]
    took = time.monotonic() - start
    print(f"{COMMANDS} commands, {sum(sizes) / 1e6:.0f} MB of output, in {took:.1f} s")
    assert wrong == [], f"{len(wrong)} of {COMMANDS} outputs differ: {wrong[:5]}"
    # Connected, paramiko logs to its own logger again (quiet only while connecting).
    transport = kvm_guest.ssh.get_transport()
    assert transport is not None and transport.get_log_channel() == "paramiko.transport"


def test_a_guest_that_panics_during_put_is_guest_crashed_within_seconds(kvm_guest, tmp_path):
    big = tmp_path / "big"
    with big.open("wb") as f:
        f.truncate(8 << 30)  # sparse: far more than the guest takes in before it panics
    kvm_guest.succeed(
        "setsid sh -c 'sleep 2; echo c > /proc/sysrq-trigger' </dev/null >/dev/null 2>&1 &"
    )
    outcome: list[BaseException] = []

    def put() -> None:
        try:
            kvm_guest.put(big, "/dev/null")
        except BaseException as exc:
            outcome.append(exc)

    start = time.monotonic()
    thread = threading.Thread(target=put, daemon=True)
    thread.start()
    thread.join(60)  # the put of old waited forever; the guest's teardown ends it
    took = time.monotonic() - start
    assert not thread.is_alive(), "put still waits 60 s after the guest panicked"
    assert len(outcome) == 1 and isinstance(outcome[0], GuestCrashed), outcome
    message = str(outcome[0])
    assert "panicked: Kernel panic - not syncing: sysrq triggered crash" in message
    assert f"put {str(big)!r} -> '/dev/null' was running" in message
    print(f"GuestCrashed {took:.1f} s after the put started")
    assert took < 30
    with pytest.raises(GuestCrashed):  # and the guest stays known dead
        kvm_guest.get("/etc/hostname", tmp_path / "hostname")
