"""Stress: 40 guest tests over three images with ``-n 4`` on this machine's cores.

Runs when the session is given at least three catalog images, as the matrix stage of
scripts/test.sh does::

    pytest tests/integration/test_stress.py --kvm-image debian-11 \
        --kvm-image debian-12 --kvm-image debian-13

The inner run's tests each record which guest they had (name, image, worker, host
ports, QEMU PID, when); the outer test then checks that every test passed in a guest
of its own image, that no two guests collided on a name or a host port while both
were alive, that all four workers worked, and that nothing is left: no QEMU process,
run dir, lease or tap device of the inner run.
"""

from __future__ import annotations

import json

import pytest

from pytest_kvm.images.recipe import catalog_names
from tests.integration.support.inner import NOTHING, leftovers
from tests.integration.support.inner import InnerRuns as _Inner
from tests.integration.support.inner import run_ids as _run_ids

TESTS = 40
WORKERS = 4

INNER_SUITE = """
import json, os, time
import pytest

OUT = os.environ["STRESS_OUT"]
PER_IMAGE = int(os.environ["STRESS_PER_IMAGE"])
EXTRA = os.environ["STRESS_EXTRA_IMAGE"]


def _record(guest, image):
    return {
        "image": image.name,
        "name": guest.name,
        "worker": os.environ.get("PYTEST_XDIST_WORKER", "main"),
        "codename": guest.os_release.get("VERSION_CODENAME", ""),
        "ports": sorted(guest.forwarded_ports.values()),
        "qemu_pid": guest.machine.pid,
        "start": time.time(),
    }


def _work(guest, n, tmp_path):
    assert guest.succeed(f"echo {n}").strip() == str(n)
    src = tmp_path / "in.txt"
    src.write_text(f"stress {n}\\n")
    guest.put(src, "/root/in.txt")
    assert guest.get("/root/in.txt", tmp_path / "back.txt").read_text() == f"stress {n}\\n"
    assert guest.run("exit 3").exit_status == 3
    port = guest.forward_port(22)  # a second host port, chosen free, on this guest
    assert port != guest.ssh_port
    return port


@pytest.mark.parametrize("n", range(PER_IMAGE))
def test_stress(kvm_guest, kvm_image, n, tmp_path):
    entry = _record(kvm_guest, kvm_image)
    _work(kvm_guest, n, tmp_path)
    entry["ports"] = sorted(kvm_guest.forwarded_ports.values())
    entry["end"] = time.time()
    with open(OUT, "a") as out:
        out.write(json.dumps(entry) + "\\n")


@pytest.mark.kvm(image=EXTRA)
def test_stress_extra(kvm_guest, kvm_image, tmp_path):
    test_stress(kvm_guest, kvm_image, -1, tmp_path)
"""


def test_forty_guest_tests_over_three_images_with_four_workers(
    request, pytester, inner_env, cache_arg
):
    images = [str(i) for i in request.config.getoption("kvm_image") or []]
    images = [i for i in dict.fromkeys(images) if i in catalog_names()]
    if len(images) < 3:
        pytest.skip("needs three catalog images (scripts/test.sh's matrix stage gives them)")
    images = images[:3]
    # 13 tests on each image, one more on the first: 40.
    per_image, extra = divmod(TESTS, len(images))
    assert extra == 1
    pytester.makepyfile(test_stress=INNER_SUITE)
    out = pytester.path / "guests.jsonl"
    runs = _Inner(pytester, inner_env, [*(f"--kvm-image={i}" for i in images), cache_arg])
    runs.env = {
        "STRESS_OUT": str(out),
        "STRESS_PER_IMAGE": str(per_image),
        "STRESS_EXTRA_IMAGE": images[0],
    }
    try:
        proc = runs.start("-n", str(WORKERS), "-q", "-rfE")
        status = runs.wait(proc)
        text = runs.output(proc)
    finally:
        runs.stop()
    assert status == 0, text[-6000:]
    assert f"{TESTS} passed" in text, text[-3000:]
    guests = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(guests) == TESTS
    # Every test ran in a guest of its own image, each a guest of its own.
    codenames = {}
    for guest in guests:
        codenames.setdefault(guest["image"], set()).add(guest["codename"])
    assert set(codenames) == set(images)
    assert all(len(names) == 1 and "" not in names for names in codenames.values()), codenames
    assert len({names.pop() for names in codenames.values()}) == len(images)
    assert len({g["name"] for g in guests}) == TESTS
    # All four workers took tests, and ran guests side by side.
    assert {g["worker"] for g in guests} == {f"gw{i}" for i in range(WORKERS)}
    overlaps = 0
    for i, a in enumerate(guests):
        for b in guests[i + 1 :]:
            if a["start"] < b["end"] and b["start"] < a["end"]:
                overlaps += 1
                # No host port and no QEMU process is shared by two live guests.
                assert not set(a["ports"]) & set(b["ports"]), (a, b)
                assert a["qemu_pid"] != b["qemu_pid"], (a, b)
    assert overlaps > 0, "no two guests were ever alive at the same time"
    # Shown with -rP: the inner run's summary and how many guests lived at once.
    events = sorted([(g["start"], 1) for g in guests] + [(g["end"], -1) for g in guests])
    alive = peak = 0
    for _, step in events:
        alive += step
        peak = max(peak, alive)
    print(text.strip().splitlines()[-1], f"; at most {peak} guests alive at once")
    # The run's id is in its guests' names (-q prints none of them).
    names = "\n".join(g["name"] for g in guests)
    assert leftovers(inner_env, _run_ids(inner_env, names)) == NOTHING
