"""tpm=True where swtpm is missing: the test errors with one line naming the Debian
package, before any guest starts (nothing is left behind)."""

from __future__ import annotations

import subprocess

import pytest

from pytest_kvm.images.facts import write_facts


def test_tpm_without_swtpm_is_one_line_naming_the_package(
    pytester: pytest.Pytester, tmp_path, monkeypatch
):
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(pytester.path / "ok.qcow2"),
                    "16M"], check=True)  # fmt: skip
    write_facts(pytester.path / "ok.qcow2", cloud_init=True)  # no libguestfs look at it
    runtime = tmp_path / "rt"
    runtime.mkdir()
    monkeypatch.setenv("PYTEST_KVM_RUNTIME_DIR", str(runtime))
    monkeypatch.setattr("pytest_kvm.tpm.SWTPM", "swtpm-is-not-installed-here")
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.kvm(tpm=True)
        def test_marked(kvm_guest):
            pass

        def test_factory(kvm_guest_factory):
            kvm_guest_factory(tpm=True)
        """
    )
    result = pytester.runpytest("--kvm-image=ok.qcow2", "--kvm-accel=tcg", "-p", "no:randomly")
    result.assert_outcomes(errors=1, failed=1)
    out = result.stdout.str()
    # The error as pytest shows it: one line each, naming the test and the package.
    lines = [line for line in out.splitlines() if line.startswith("E ") and "swtpm" in line]
    assert len(lines) == 2, out
    for test in ("test_marked[ok]", "test_factory[ok]"):
        assert any(
            f"{test}: tpm=True needs swtpm, which is not on PATH here "
            "(Debian package swtpm: apt-get install swtpm)" in line
            for line in lines
        ), out
    assert list(runtime.glob("pytest-kvm-*/kvm-*")) == []
