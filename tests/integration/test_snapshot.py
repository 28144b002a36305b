"""Prepared snapshots (``kvm_snapshot``) with real guests.

The in-process tests share one snapshot (and one chained on it) in the run's cache:
their keys do not change between runs, so CI builds them once. The pytester runs use
a private cache whose templates directory links the run's base template, so that
they build only snapshots, never a template from scratch."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from pytest_kvm.snapshot import define
from pytest_kvm.template import Shape

SERVICE = """\
[Unit]
Description=a service a snapshot's setup installed

[Service]
ExecStart=/bin/sh -c 'echo prepared-service-up > /run/prepared-service; exec sleep infinity'

[Install]
WantedBy=multi-user.target
"""


def prepare(guest):
    guest.succeed("echo prepared-state > /etc/prepared")
    unit = shlex.quote(SERVICE)
    guest.succeed(f"printf '%s' {unit} > /etc/systemd/system/prepared.service")
    guest.succeed("systemctl daemon-reload && systemctl enable --now prepared.service")


def prepare_more(guest):
    guest.succeed("cat /etc/prepared > /etc/prepared-copy && echo second-layer > /etc/second")


# At module level, so that a marker can name it; the fixture hands the same one.
PREPARED = define("it-prepared", prepare)
CHAINED = define("it-chained", prepare_more, image=PREPARED)


@pytest.fixture(scope="session")
def prepared():
    return PREPARED


def test_a_clone_has_the_prepared_state_and_service(kvm_guest_factory, prepared):
    g = kvm_guest_factory(image=prepared)
    assert g.template is not None and "@it-prepared-" in g.template.name
    assert g.succeed("cat /etc/prepared").strip() == "prepared-state"
    g.wait_for_unit("prepared.service")
    assert g.succeed("cat /run/prepared-service").strip() == "prepared-service-up"
    # Restored, not booted: and made its own machine like any clone.
    assert "restore" in g.boot_timings
    assert g.succeed("hostname").strip() == g.name
    # Its disk is an overlay on the snapshot's, which is one on the base template's.
    meta = json.loads((g.template.dir / "meta.json").read_text())
    base = g.template.dir.parent / meta["base"]
    assert (base / "meta.json").is_file() and "@" not in base.name
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", "--backing-chain", str(g.template.disk)],
            check=True, capture_output=True, text=True,
        ).stdout
    )  # fmt: skip
    assert info[0]["full-backing-filename"] == str(base / "disk.qcow2")
    subprocess.run(["qemu-img", "check", "-q", str(g.template.disk)], check=True)


def test_one_test_writes(kvm_guest_factory, prepared):
    g = kvm_guest_factory(image=prepared)
    g.succeed("echo leak > /root/leak && rm /etc/prepared && sync")


def test_the_next_test_sees_none_of_it(kvm_guest_factory, prepared):
    g = kvm_guest_factory(image=prepared)
    g.fail("test -e /root/leak")
    assert g.succeed("cat /etc/prepared").strip() == "prepared-state"


def test_two_clones_of_a_snapshot_are_two_machines(kvm_guest_factory, prepared):
    a = kvm_guest_factory(image=prepared)
    b = kvm_guest_factory(image=prepared, hostname="second")
    assert a.template == b.template
    assert b.succeed("hostname").strip() == "second"
    a.succeed("echo from-a > /root/mine && sync")
    b.fail("test -e /root/mine")


def test_what_setup_wrote_is_on_the_saved_disk(kvm_guest_factory, prepared):
    # Not only in the saved RAM's page cache: dropped, the file is read from the disk.
    # (A reboot shows the same and costs a boot under TCG.)
    g = kvm_guest_factory(image=prepared)
    g.succeed("sync; echo 3 > /proc/sys/vm/drop_caches")
    assert g.succeed("cat /etc/prepared").strip() == "prepared-state"
    assert g.succeed("systemctl is-enabled prepared.service").strip() == "enabled"


@pytest.mark.kvm(image=PREPARED)
def test_the_marker_names_a_snapshot(kvm_guest):
    assert kvm_guest.succeed("cat /etc/prepared").strip() == "prepared-state"


def test_a_snapshot_of_a_snapshot_has_both_states(kvm_guest_factory):
    g = kvm_guest_factory(image=CHAINED)
    assert g.succeed("cat /etc/prepared-copy").strip() == "prepared-state"
    assert g.succeed("cat /etc/second").strip() == "second-layer"
    g.wait_for_unit("prepared.service")
    meta = json.loads((g.template.dir / "meta.json").read_text())
    assert "@it-prepared-" in meta["base"]


def test_image_list_shows_snapshots(kvm_guest_factory, prepared, cache_arg):
    g = kvm_guest_factory(image=prepared)
    cache = cache_arg.split("=", 1)[1]
    out = subprocess.run(
        [sys.executable, "-m", "pytest_kvm.cli", "--cache", cache, "image", "list"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    assert "SNAPSHOTS" in out
    meta = json.loads((g.template.dir / "meta.json").read_text())
    # A used cache lists more it-prepared snapshots (other images' bases, older
    # setups): this one is the entry whose second line is its directory.
    lines = out.splitlines()
    where = next(i for i, line in enumerate(lines) if line.strip() == str(g.template.dir))
    line = lines[where - 1]
    assert line.strip().startswith("it-prepared ")
    assert meta["base"] in line and "stale" not in line


# -- inner runs: builds counted -------------------------------------------------------


@pytest.fixture
def private_cache(tmp_path, kvm_image, request):
    """A cache with only the run's base template in it (linked, not copied)."""
    session = request.getfixturevalue("_kvm_session")
    # Inner runs name the image by its path, which names their template.
    image = session.image(str(kvm_image.path))
    base = session.templates.get(image, Shape(memory=1024, cpus=2), 300)
    cache = tmp_path / "cache"
    (cache / "templates").mkdir(parents=True)
    (cache / "templates" / base.name).symlink_to(base.dir)
    return cache


INNER = """
import json, os, pytest

def setup(guest):
    guest.put({input!r}, "/etc/from-input")
    guest.succeed("echo {marker} > /etc/marker")

@pytest.fixture(scope="session")
def snap(kvm_snapshot):
    return kvm_snapshot({name!r}, setup, inputs=[{input!r}])

@pytest.mark.parametrize("n", range({tests}))
def test_uses(kvm_guest_factory, snap, n):
    g = kvm_guest_factory(image=snap)
    meta = json.loads((g.template.dir / "meta.json").read_text())
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open({seen!r} + f"/{{worker}}-{{n}}", "w") as out:
        out.write(json.dumps([g.template.name, meta["created"],
                              g.succeed("cat /etc/from-input /etc/marker")]))
"""


def _inner(pytester, tmp_path, cache, name, marker, content, *args, tests=2):
    seen = tmp_path / f"seen-{len(list(tmp_path.glob('seen-*')))}"
    seen.mkdir()
    (pytester.path / "input.txt").write_text(content)
    pytester.makepyfile(
        test_inner=INNER.format(
            name=name, marker=marker, input="input.txt", seen=str(seen), tests=tests
        )
    )
    image = os.environ.get("INNER_IMAGE", "")
    result = pytester.runpytest_subprocess(
        f"--kvm-image={image}", f"--kvm-cache={cache}", "-p", "no:cacheprovider", *args
    )
    records = {p.name: json.loads(p.read_text()) for p in seen.iterdir()}
    return result, records


@pytest.fixture
def inner_image(kvm_image, monkeypatch):
    monkeypatch.setenv("INNER_IMAGE", str(kvm_image.path))


def test_built_once_reused_and_rebuilt_only_when_its_key_changes(
    pytester, tmp_path, private_cache, inner_image
):
    def builds(result):
        return sum("making snapshot web" in line for line in result.outlines)

    first, records = _inner(pytester, tmp_path, private_cache, "web", "v1", "input-1\n")
    first.assert_outcomes(passed=2)
    assert builds(first) == 1
    made = {r[1] for r in records.values()}
    assert len(made) == 1
    assert {r[2] for r in records.values()} == {"input-1\nv1\n"}

    again, records = _inner(pytester, tmp_path, private_cache, "web", "v1", "input-1\n")
    again.assert_outcomes(passed=2)
    assert builds(again) == 0 and {r[1] for r in records.values()} == made

    changed_input, records = _inner(pytester, tmp_path, private_cache, "web", "v1", "input-2\n")
    changed_input.assert_outcomes(passed=2)
    assert builds(changed_input) == 1
    assert {r[2] for r in records.values()} == {"input-2\nv1\n"}

    changed_setup, records = _inner(pytester, tmp_path, private_cache, "web", "v2", "input-2\n")
    changed_setup.assert_outcomes(passed=2)
    assert builds(changed_setup) == 1
    assert {r[2] for r in records.values()} == {"input-2\nv2\n"}
    snapshots = list((private_cache / "templates").glob("*@web-*/meta.json"))
    assert len(snapshots) == 3
    assert list((private_cache / "templates").glob(".*.building-*")) == []


def test_parallel_workers_build_a_snapshot_once(pytester, tmp_path, private_cache, inner_image):
    result, records = _inner(
        pytester, tmp_path, private_cache, "par", "x", "in\n", "-n", "2", tests=4
    )
    result.assert_outcomes(passed=4)
    assert {name.split("-")[0] for name in records} == {"gw0", "gw1"}, records
    # Both workers cloned one snapshot, made once (one creation time).
    assert len({(r[0], r[1]) for r in records.values()}) == 1, records
    assert len(list((private_cache / "templates").glob("*@par-*/meta.json"))) == 1


def test_a_failing_setup_reports_its_output_and_caches_nothing(pytester, private_cache, kvm_image):
    pytester.makepyfile(
        """
        import pytest

        def setup(guest):
            guest.succeed("echo on-stdout-$((40+2)); echo on-stderr-$((40+3)) >&2; exit 3")

        @pytest.fixture(scope="session")
        def broken(kvm_snapshot):
            return kvm_snapshot("broken", setup)

        @pytest.mark.parametrize("n", range(2))
        def test_uses(kvm_guest_factory, broken, n):
            kvm_guest_factory(image=broken)
        """
    )
    result = pytester.runpytest_subprocess(
        f"--kvm-image={kvm_image.path}", f"--kvm-cache={private_cache}", "-p", "no:cacheprovider"
    )
    result.assert_outcomes(failed=2)
    out = result.stdout.str()
    assert "SnapshotFailed" in out and "kvm_snapshot 'broken': setup failed" in out
    # Both output tails, not just the command's text (which has no "42" in it).
    assert re.search(r"its stdout:\nE\s+on-stdout-42\n", out), out
    assert re.search(r"its stderr:\nE\s+on-stderr-43\n", out) and "(exit 3)" in out
    assert "last console lines" in out
    # One attempt in this process; the second test got the same error at once.
    assert sum("making snapshot broken" in line for line in result.outlines) == 1
    names = [p.name for p in (private_cache / "templates").iterdir()]
    assert not [n for n in names if "broken" in n and not n.endswith(".lock")], names
