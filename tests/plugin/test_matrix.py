"""The image matrix without guests: ids, kvm_skip_image, --kvm-dist-by-image, properties.

A conftest in each sandbox replaces the ``kvm_image`` fixture by one that returns the
parameter, so tests run without resolving or booting anything."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.support.images import make_qcow2
from tests.support.runs import assert_usage_error

FAKE_IMAGE_FIXTURE = """
import pytest

@pytest.fixture
def kvm_image(request):
    return request.param
"""


def two_images(pytester: pytest.Pytester) -> list[str]:
    a = make_qcow2(pytester.path / "alpha.qcow2")
    b = make_qcow2(pytester.path / "beta.qcow2")
    return [f"--kvm-image={a}", f"--kvm-image={b}"]


def test_each_image_is_a_case_with_its_name_as_id(pytester: pytest.Pytester):
    pytester.makeconftest(FAKE_IMAGE_FIXTURE)
    pytester.makepyfile("def test_x(kvm_image):\n    assert kvm_image.endswith('.qcow2')\n")
    images = two_images(pytester)
    # The same image given twice runs once.
    result = pytester.runpytest("-v", *images, images[0])
    result.stdout.fnmatch_lines(["*test_x[[]alpha[]] PASSED*", "*test_x[[]beta[]] PASSED*"])
    result.assert_outcomes(passed=2)


def test_skip_image_skips_that_case_with_its_reason(pytester: pytest.Pytester):
    pytester.makeconftest(FAKE_IMAGE_FIXTURE)
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.kvm_skip_image("alpha", reason="no nftables there")
        def test_fw(kvm_image):
            pass

        @pytest.mark.kvm_skip_image(["alpha", "beta"], reason="broken everywhere")
        def test_none(kvm_image):
            pass

        @pytest.mark.kvm_skip_image("beta", reason="module-wide")
        class TestClass:
            @pytest.mark.kvm_skip_image("beta", reason="closest wins")
            def test_m(self, kvm_image):
                pass

        @pytest.mark.kvm_skip_image("gamma", reason="not in this run")
        def test_other(kvm_image):
            pass
        """
    )
    result = pytester.runpytest("-rs", "-v", *two_images(pytester))
    result.stdout.fnmatch_lines_random(
        [
            "*test_fw[[]alpha[]] SKIPPED*",
            "*test_fw[[]beta[]] PASSED*",
            "*test_m[[]alpha[]] PASSED*",
            "*test_m[[]beta[]] SKIPPED*",
            "*test_other[[]alpha[]] PASSED*",
            "SKIPPED [[]1[]] *:3: pytest-kvm: skipped on alpha: no nftables there",
            "SKIPPED [[]1[]] *pytest-kvm: skipped on alpha: broken everywhere",
            "SKIPPED [[]1[]] *pytest-kvm: skipped on beta: broken everywhere",
            "SKIPPED [[]1[]] *pytest-kvm: skipped on beta: closest wins",
        ]
    )
    result.assert_outcomes(passed=4, skipped=4)


def test_skip_image_matches_the_value_given_too(pytester: pytest.Pytester):
    pytester.makeconftest(FAKE_IMAGE_FIXTURE)
    a = make_qcow2(pytester.path / "alpha.qcow2")
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.kvm_skip_image({str(a)!r}, reason="by path")
        def test_x(kvm_image):
            pass
        """
    )
    result = pytester.runpytest("-rs", f"--kvm-image={a}")
    result.stdout.fnmatch_lines(["*pytest-kvm: skipped on alpha: by path*"])
    result.assert_outcomes(skipped=1)


@pytest.mark.parametrize(
    ("marker", "needle"),
    [
        ("kvm_skip_image(reason='why')", "names no image"),
        ("kvm_skip_image('debian-11')", "reason= is required"),
        ("kvm_skip_image('debian-11', reason='')", "reason= is required"),
        ("kvm_skip_image(11, reason='why')", "names no image"),
        ("kvm_skip_image([], reason='why')", "names no image"),
        ("kvm_skip_image('debian-11', reason='x', when='always')", "unknown argument when="),
    ],
)
def test_bad_skip_image_is_a_usage_error(pytester: pytest.Pytester, marker, needle):
    pytester.makepyfile(
        f"import pytest\n\n@pytest.mark.{marker}\ndef test_x(kvm_guest):\n    pass\n"
    )
    result = pytester.runpytest("--collect-only", *two_images(pytester))
    assert_usage_error(result, "pytest-kvm:", "test_x (@pytest.mark.kvm_skip_image)", needle)


def test_bad_skip_image_on_a_test_without_guest_is_an_error_too(pytester: pytest.Pytester):
    pytester.makepyfile(
        "import pytest\n\n@pytest.mark.kvm_skip_image('x')\ndef test_x():\n    pass\n"
    )
    assert_usage_error(pytester.runpytest(), "reason= is required")


def test_skip_image_marker_is_registered(pytester: pytest.Pytester):
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.kvm_skip_image(*images, reason=)*"])


WORKER_LOG = """
import json, os, pytest

@pytest.mark.parametrize("n", range(6))
def test_x(kvm_image, n):
    with open("log.jsonl", "a") as out:
        out.write(json.dumps([kvm_image, os.environ["PYTEST_XDIST_WORKER"]]) + "\\n")

def test_plain():
    pass
"""


def workers_per_image(path: Path) -> dict[str, set[str]]:
    seen: dict[str, set[str]] = {}
    for line in (path / "log.jsonl").read_text().splitlines():
        image, worker = json.loads(line)
        seen.setdefault(Path(image).stem, set()).add(worker)
    return seen


def test_dist_by_image_runs_each_image_on_one_worker(pytester: pytest.Pytester):
    pytester.makeconftest(FAKE_IMAGE_FIXTURE)
    pytester.makepyfile(WORKER_LOG)
    result = pytester.runpytest("-n", "2", "--kvm-dist-by-image", "-v", *two_images(pytester))
    result.assert_outcomes(passed=13)
    result.stdout.fnmatch_lines(
        ["*--kvm-dist-by-image: each image's tests run on one worker*", "*ImageScheduling*"]
    )
    seen = workers_per_image(pytester.path)
    assert set(seen) == {"alpha", "beta"}
    assert all(len(workers) == 1 for workers in seen.values()), seen


def test_dist_by_image_from_ini_with_explicit_dist_load(pytester: pytest.Pytester):
    pytester.makeconftest(FAKE_IMAGE_FIXTURE)
    pytester.makeini("[pytest]\nkvm_dist_by_image = true\n")
    pytester.makepyfile(WORKER_LOG)
    result = pytester.runpytest("-n", "2", "--dist", "load", *two_images(pytester))
    result.assert_outcomes(passed=13)
    assert all(len(w) == 1 for w in workers_per_image(pytester.path).values())


def test_dist_by_image_with_one_image_does_not_group(pytester: pytest.Pytester):
    pytester.makeconftest(FAKE_IMAGE_FIXTURE)
    pytester.makepyfile(WORKER_LOG)
    result = pytester.runpytest("-n", "2", "--kvm-dist-by-image", two_images(pytester)[0])
    result.assert_outcomes(passed=7)
    result.stdout.fnmatch_lines(["*--kvm-dist-by-image: one image, tests are not grouped*"])
    assert "ImageScheduling" not in result.stdout.str()


def test_dist_by_image_refuses_another_dist_mode(pytester: pytest.Pytester):
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest("-n", "2", "--dist", "loadfile", "--kvm-dist-by-image",
                                *two_images(pytester))  # fmt: skip
    assert_usage_error(result, "in place of xdist's --dist load; --dist loadfile was given")


def test_dist_by_image_bad_env_value(pytester: pytest.Pytester, monkeypatch):
    monkeypatch.setenv("PYTEST_KVM_DIST_BY_IMAGE", "sometimes")
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest("-n", "2", *two_images(pytester))
    assert_usage_error(result, "environment PYTEST_KVM_DIST_BY_IMAGE: 'sometimes'")


def test_without_the_flag_xdist_does_not_group(pytester: pytest.Pytester):
    pytester.makeconftest(FAKE_IMAGE_FIXTURE)
    pytester.makepyfile(WORKER_LOG)
    result = pytester.runpytest("-n", "2", "-v", *two_images(pytester))
    result.assert_outcomes(passed=13)
    assert "scheduling tests via LoadScheduling" in result.stdout.str()


@pytest.mark.parametrize(
    ("nodeid", "scope"),
    [
        ("t.py::test_x[debian-12]", "kvm-image-debian-12"),
        ("t.py::test_x[debian-12-sysvinit]", "kvm-image-debian-12-sysvinit"),
        ("t.py::C::test_x[debian-12-3]", "kvm-image-debian-12"),
        ("t.py::test_x[a-debian-12-b]", "kvm-image-debian-12"),
        ("t.py::test_x[debian-13]", "t.py::test_x[debian-13]"),
        ("t.py::test_x", "t.py::test_x"),
        ("t.py::test_x[debian-12]@db", "db"),
    ],
)
def test_image_scope(nodeid, scope):
    from pytest_kvm.matrix import image_scope

    assert image_scope(nodeid, ["debian-12", "debian-12-sysvinit"]) == scope


def test_junit_xml_carries_the_image(pytester: pytest.Pytester):
    pytester.makeconftest(FAKE_IMAGE_FIXTURE)
    pytester.makepyfile(
        """
        import pytest

        def test_x(kvm_image):
            pass

        @pytest.mark.kvm_skip_image("beta", reason="r")
        def test_y(kvm_image):
            pass

        def test_plain():
            pass
        """
    )
    result = pytester.runpytest("--junitxml=out.xml", *two_images(pytester))
    result.assert_outcomes(passed=4, skipped=1)
    props = {
        case.get("name"): {p.get("name"): p.get("value") for p in case.iter("property")}
        for case in ET.parse(pytester.path / "out.xml").iter("testcase")
    }
    assert props["test_x[alpha]"] == {"kvm_image": "alpha"}
    assert props["test_x[beta]"] == {"kvm_image": "beta"}
    assert props["test_y[beta]"] == {"kvm_image": "beta"}  # skipped: still named
    assert props["test_plain"] == {}
