"""kvm_snapshot's plugin side, without guests: the fixture, markers naming a snapshot."""

import pytest

from tests.support.images import make_qcow2

SNAPSHOT_TESTS = """
import pytest
from pytest_kvm.snapshot import define

def setup(guest):
    guest.succeed("true")

WEB = define("web", setup)

@pytest.mark.kvm(image=WEB, memory=768)
def test_marked(kvm_guest):
    pass

def test_recipe(kvm_snapshot):
    snap = kvm_snapshot("db", setup, cpus=1)
    assert snap.name == "db" and snap.shape() == {"cpus": 1}
    assert "def setup" in snap.source

def test_bad_recipe(kvm_snapshot):
    kvm_snapshot("not a name", setup)
"""


def test_a_marker_naming_a_snapshot_keeps_the_image_matrix(pytester: pytest.Pytester):
    a = make_qcow2(pytester.path / "alpha.qcow2")
    b = make_qcow2(pytester.path / "beta.qcow2")
    pytester.makepyfile(SNAPSHOT_TESTS)
    result = pytester.runpytest("--collect-only", "-q", f"--kvm-image={a}", f"--kvm-image={b}")
    result.stdout.fnmatch_lines(["*test_marked[[]alpha[]]", "*test_marked[[]beta[]]"])


def test_the_fixture_makes_recipes_and_says_what_is_wrong_with_one(pytester: pytest.Pytester):
    pytester.makepyfile(SNAPSHOT_TESTS)
    result = pytester.runpytest("-k", "recipe and not marked")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*KvmConfigError: kvm_snapshot('not a name'): the name must be*"])
