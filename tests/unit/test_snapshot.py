"""Prepared snapshots' logic without guests: the recipe, its key, prune and listing."""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import pytest

from pytest_kvm import cli
from pytest_kvm.errors import KvmConfigError
from pytest_kvm.images import Image
from pytest_kvm.request import marker_settings, marker_snapshot
from pytest_kvm.snapshot import Snapshot, define, snapshot_key, snapshot_name
from pytest_kvm.template import prune, snapshot_of, stale_reason
from tests.support.templates import base_image, make_template


@pytest.fixture
def image(tmp_path: Path) -> Image:
    return base_image(tmp_path)


def setup_one(guest):
    guest.succeed("echo one")


def setup_two(guest):
    guest.succeed("echo two")


def base_template(key: str = "0123456789abcdef", dir: Path = Path("/nonexistent")):
    return types.SimpleNamespace(key=key, name=f"debian-12-1024M-2cpu-user-{key}", dir=dir)


def key_of(snap: Snapshot, inputs: dict[str, str] | None = None, base: str = "k1") -> str:
    return snapshot_key(snap, base_template(base), inputs or {})  # type: ignore[arg-type]


def made_at(tmp_path: Path, created: float) -> Path:
    (tmp_path / "meta.json").write_text(json.dumps({"created": created}))
    return tmp_path


def test_the_key_follows_base_name_setup_source_and_input_contents(tmp_path):
    one = define("web", setup_one)
    first = key_of(one)
    assert first == key_of(define("web", setup_one))  # the same recipe, the same key
    others = {
        key_of(one, base="k2"),  # another base template
        key_of(define("web2", setup_one)),
        key_of(define("web", setup_two)),  # another setup
        key_of(one, {"site.conf": "aa"}),  # an input's contents
    }
    assert first not in others and len(others) == 4
    assert key_of(one, {"site.conf": "aa"}) != key_of(one, {"site.conf": "bb"})
    # A base template made again under its key (say, it was damaged) is another base.
    assert first != snapshot_key(one, base_template("k1", made_at(tmp_path, 1.0)), {})
    made_again = snapshot_key(one, base_template("k1", made_at(tmp_path, 2.0)), {})
    assert made_again != snapshot_key(one, base_template("k1", made_at(tmp_path, 1.0)), {})
    assert "echo one" in one.source and "def setup_one" in one.source


def test_a_setup_without_source_is_keyed_by_its_code_with_a_warning():
    namespace: dict[str, object] = {}
    exec("def setup(guest):\n    guest.succeed('x')\n", namespace)
    with pytest.warns(UserWarning, match="source of setup is not available"):
        snap = define("web", namespace["setup"])  # type: ignore[arg-type]
    assert snap.source.startswith("code:")
    with pytest.raises(KvmConfigError, match="no source and no code"):
        define("web", print)


def test_the_recipe_is_checked_where_it_is_made(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "site.conf").write_text("x")
    snap = define("web", setup_one, inputs=["site.conf"], memory=2048)
    assert snap.inputs == (("site.conf", tmp_path / "site.conf"),)
    assert snap.shape() == {"memory": 2048}
    with pytest.raises(KvmConfigError, match="is not a file"):
        define("web", setup_one, inputs=["missing.conf"])
    with pytest.raises(KvmConfigError, match="not network"):
        define("web", setup_one, network="bridge=br0")  # type: ignore[arg-type]
    with pytest.raises(KvmConfigError, match="positive integer"):
        define("web", setup_one, memory=0)
    with pytest.raises(KvmConfigError, match="the name must be"):
        define("a b", setup_one)
    with pytest.raises(KvmConfigError, match="setup must be a function"):
        define("web", "apt-get install nginx")  # type: ignore[arg-type]


def test_a_chain_starts_at_the_snapshot_over_an_image():
    a = define("a", setup_one, image="debian-12", cpus=1, memory=512)
    b = define("b", setup_two, image=a, memory=2048)
    assert b.chain() == [a, b]
    assert b.base_image == "debian-12"
    assert b.shape() == {"memory": 2048, "cpus": 1}  # the outer one wins
    assert define("c", setup_one).base_image is None  # the test's image


def test_a_snapshot_is_named_after_its_base_without_the_base_key():
    snap = define("web", setup_one)
    name = snapshot_name(snap, base_template(), "fedcba9876543210")  # type: ignore[arg-type]
    assert name == "debian-12-1024M-2cpu-user@web-fedcba9876543210"


class Node:
    def __init__(self, *kwargs: dict[str, object]) -> None:
        self._markers = [types.SimpleNamespace(args=(), kwargs=k) for k in kwargs]
        self.nodeid = "t.py::test"

    def iter_markers(self, name: str):  # closest first, like pytest's
        return iter(self._markers)


def test_a_marker_may_name_a_snapshot_and_the_image_matrix_stays():
    from pytest_kvm.config import Settings

    snap = define("web", setup_one)
    base = Settings(images=("debian-12",))
    node = Node({"image": snap}, {"memory": 2048})
    assert marker_snapshot(node) is snap
    settings = marker_settings(node, base)
    assert settings.images == ("debian-12",) and settings.memory == 2048
    # A closer marker naming an image overrides a farther one naming a snapshot.
    assert marker_snapshot(Node({"image": "debian-11"}, {"image": snap})) is None
    assert marker_snapshot(Node({"memory": 512})) is None
    # A snapshot that pins its image: the test runs on that image only.
    pinned = define("web", setup_one, image="debian-11")
    assert marker_settings(Node({"image": pinned}), base).images == ("debian-11",)


def make_snapshot(root: Path, image, base: Path, name: str = "t@web-1") -> Path:
    """A snapshot over ``base`` named ``<base>@<snapshot>-<key>``."""
    work = make_template(root, image, name)
    meta = json.loads((work / "meta.json").read_text())
    created = json.loads((base / "meta.json").read_text())["created"]
    meta.update(snapshot=name.split("@")[1].rsplit("-")[0], base=base.name, base_created=created)
    (work / "meta.json").write_text(json.dumps(meta))
    return work


def test_prune_removes_a_snapshot_whose_base_is_gone_or_made_again(image, tmp_path, capsys):
    root = tmp_path / "templates"
    base = make_template(root, image, "t")
    snap = make_snapshot(root, image, base)
    assert stale_reason(snap) == "" and snapshot_of(snap) == ("web", "t")
    assert snapshot_of(base) is None
    assert cli.main(["--cache", str(tmp_path), "image", "list"]) == 0
    listed = capsys.readouterr().out
    assert "SNAPSHOTS" in listed
    assert any(line.split()[:1] == ["web"] and line.rstrip().endswith(" t") for line in
               listed.splitlines()), listed  # fmt: skip
    # The base was made again (another "created"): the snapshot is stale, the base not.
    meta = json.loads((base / "meta.json").read_text())
    meta["created"] += 1
    (base / "meta.json").write_text(json.dumps(meta))
    why = stale_reason(snap)
    assert "was made again" in why
    assert prune(root).removed == [(snap, why)]
    assert base.exists() and not snap.exists()
    # A base that is gone.
    again = make_snapshot(root, image, base, "t@web-2")
    shutil.rmtree(base)
    assert "is gone" in stale_reason(again)
    assert [p for p, _ in prune(root).removed] == [again]


def test_prune_removes_a_snapshot_that_a_newer_build_of_it_replaced(image, tmp_path):
    root = tmp_path / "templates"
    base = make_template(root, image, "t")
    old = make_snapshot(root, image, base, "t@web-1")
    new = make_snapshot(root, image, base, "t@web-2")
    other = make_snapshot(root, image, base, "t@db-3")
    for path, created in ((old, 1.0), (new, 2.0), (other, 0.5)):
        meta = json.loads((path / "meta.json").read_text())
        meta["created"] = created
        (path / "meta.json").write_text(json.dumps(meta))
    over_old = make_snapshot(root, image, old, "t@a-4")  # met before t@web-1, its base
    assert prune(root).removed == [
        (over_old, "its base template t@web-1 was replaced"),
        (old, "replaced by a newer build of snapshot web"),
    ]
    assert new.exists() and other.exists() and base.exists()


class Resolved(Exception):
    pass


class FakeSession:
    """What TestGuests asks of a KvmSession on the way to a snapshot's template."""

    def __init__(self) -> None:
        from pytest_kvm.request import SpecChecks

        self.specs = SpecChecks()
        self.run = types.SimpleNamespace(identity=types.SimpleNamespace(run_id="r", worker="w"))
        self.asked: list[tuple[object, object, object]] = []
        self.snapshots = types.SimpleNamespace(resolve=self.resolve)

    def backend(self, settings):
        return None

    def image(self, spec):
        return types.SimpleNamespace(
            name=f"resolved {spec}", is_encrypted=False, source="debian-12"
        )

    def resolve(self, snap, base, shape, timeout):
        self.asked.append((snap.name, base, shape))
        raise Resolved


TEST_IMAGE = types.SimpleNamespace(name="the test's image", is_encrypted=False, source="debian-12")


def ask(snap, settings=None, **factory):
    from pytest_kvm.config import Settings
    from pytest_kvm.session import TestGuests

    session = FakeSession()
    guests = TestGuests(session, settings or Settings(), TEST_IMAGE, "t.py::test")  # type: ignore[arg-type]
    with pytest.raises(Resolved):
        guests.start(image=snap, **factory)
    return session.asked[0]


def test_a_guest_of_a_snapshot_resolves_it_over_the_tests_image_at_its_shape():
    name, base, shape = ask(define("web", setup_one, memory=768))
    assert name == "web" and base.name == "the test's image"  # one per matrix image
    assert (shape.memory, shape.cpus, shape.network) == (768, 2, "user")
    # The factory's own memory= wins; a pinned image is resolved, the matrix's is not used.
    _, base, shape = ask(define("web", setup_one, image="debian-11", memory=768), memory=1536)
    assert base.name == "resolved debian-11" and shape.memory == 1536


def test_a_snapshot_on_a_network_that_cannot_restore_is_a_clear_error():
    from pytest_kvm.config import NetworkSpec, Settings
    from pytest_kvm.session import TestGuests

    settings = Settings(network=NetworkSpec("bridge=br0"))
    guests = TestGuests(FakeSession(), settings, TEST_IMAGE, "t.py::test")  # type: ignore[arg-type]
    with pytest.raises(KvmConfigError, match="image=kvm_snapshot 'web': its guests are restored"):
        guests.start(image=define("web", setup_one))
