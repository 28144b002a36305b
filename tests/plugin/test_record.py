"""--kvm-record without guests: it is in --help, its sources resolve, and a failing
test that started no guest reports as usual (no recording, no error)."""

from __future__ import annotations

import pytest


def test_the_option_is_in_help(pytester: pytest.Pytester):
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(["*--kvm-record*"])


@pytest.mark.parametrize(
    ("args", "env", "ini", "expected"),
    [
        ((), {}, "", False),
        (("--kvm-record",), {}, "", True),
        ((), {"PYTEST_KVM_RECORD": "yes"}, "", True),
        ((), {}, "kvm_record = true", True),
        ((), {"PYTEST_KVM_RECORD": "0"}, "kvm_record = true", False),
    ],
)
def test_sources_resolve(pytester, monkeypatch, args, env, ini, expected):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if ini:
        pytester.makeini(f"[pytest]\n{ini}\n")
    pytester.makepyfile(
        f"""
from pytest_kvm.plugin import settings_key

def test_it(request):
    assert request.config.stash[settings_key].record is {expected}
"""
    )
    pytester.runpytest(*args).assert_outcomes(passed=1)


def test_a_failing_test_without_guests_is_reported_as_usual(pytester, tmp_path):
    pytester.makepyfile("def test_fails():\n    assert False, 'plain failure'\n")
    result = pytester.runpytest("--kvm-record", f"--kvm-artifacts={tmp_path / 'a'}")
    result.assert_outcomes(failed=1)
    assert "plain failure" in result.stdout.str()
    assert "kvm recording" not in result.stdout.str()
    assert not (tmp_path / "a").exists()
