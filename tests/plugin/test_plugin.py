"""The plugin's own behaviour, in pytester sandboxes: options, ids, skips, errors."""

import os
import subprocess

import pytest

from pytest_kvm.accel import kvm_problem
from tests.support.images import make_qcow2
from tests.support.runs import assert_usage_error

GUEST_TEST = """
def test_guest(kvm_guest):
    kvm_guest.succeed("true")

def test_plain():
    pass
"""


def test_guest_tests_skip_without_image(pytester: pytest.Pytester):
    pytester.makepyfile(GUEST_TEST)
    result = pytester.runpytest("-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*no --kvm-image given (e.g. --kvm-image debian-12)*"])


def test_several_images_parametrize_with_readable_ids(pytester: pytest.Pytester):
    a = make_qcow2(pytester.path / "alpha.qcow2")
    b = make_qcow2(pytester.path / "beta.qcow2")
    pytester.makepyfile(GUEST_TEST)
    result = pytester.runpytest("--collect-only", "-q", f"--kvm-image={a}", f"--kvm-image={b}")
    result.stdout.fnmatch_lines(
        [
            "*test_guest[[]alpha[]]",
            "*test_guest[[]beta[]]",
            "*test_plain",
        ]
    )
    assert "test_plain[" not in result.stdout.str()


def test_marker_image_replaces_the_list(pytester: pytest.Pytester):
    a = make_qcow2(pytester.path / "alpha.qcow2")
    b = make_qcow2(pytester.path / "beta.qcow2")
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.kvm(image={str(b)!r})
        def test_only_beta(kvm_image):
            pass
        """
    )
    result = pytester.runpytest("--collect-only", "-q", f"--kvm-image={a}")
    result.stdout.fnmatch_lines(["*test_only_beta[[]beta[]]"])
    assert "alpha" not in result.stdout.str()


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--kvm-memory=lots"], ["command line --kvm-memory: 'lots' is not a whole number"]),
        (["--kvm-cpus=-1"], ["--kvm-cpus", "out of range"]),
        (["--kvm-network=bridge"], ["'bridge' is not a network spec"]),
        (["--kvm-accel=fast"], ["'fast' is not one of auto, kvm, tcg"]),
        (["--kvm-image=/nonexistent/disk.qcow2"], ["'/nonexistent/disk.qcow2' does not exist"]),
        (
            ["--kvm-image=debian-99"],
            ["'debian-99': unknown catalog image; known: debian-11, debian-12"],
        ),
        (["--kvm-image=https://example.invalid/x.qcow2#md5=00"], ["fragment must be sha256=HEX"]),
    ],
)
def test_bad_command_line_is_one_clear_line(pytester: pytest.Pytester, args, needles):
    pytester.makepyfile(GUEST_TEST)
    assert_usage_error(pytester.runpytest(*args), *needles)


def test_bad_env_value_names_the_variable(pytester: pytest.Pytester, monkeypatch):
    monkeypatch.setenv("PYTEST_KVM_MEMORY", "1GB")
    pytester.makepyfile(GUEST_TEST)
    assert_usage_error(pytester.runpytest(), "environment PYTEST_KVM_MEMORY: '1GB'")


def test_bad_ini_value_names_the_key(pytester: pytest.Pytester):
    pytester.makeini("[pytest]\nkvm_cpus = many\n")
    pytester.makepyfile(GUEST_TEST)
    assert_usage_error(pytester.runpytest(), "ini kvm_cpus: 'many' is not a whole number")


def test_text_file_is_not_a_disk_image(pytester: pytest.Pytester):
    (pytester.path / "notes.img").write_text("hello\n" * 1000)
    pytester.makepyfile(GUEST_TEST)
    assert_usage_error(pytester.runpytest("--kvm-image=notes.img"), "is not a disk image")


def test_truncated_qcow2_is_refused(pytester: pytest.Pytester):
    path = make_qcow2(pytester.path / "cut.qcow2", "64M")
    subprocess.run(
        ["qemu-io", "-c", "write -P 0x5a 0 8M", str(path)], check=True, capture_output=True
    )
    os.truncate(path, 3 * 1024 * 1024)
    pytester.makepyfile(GUEST_TEST)
    assert_usage_error(pytester.runpytest(f"--kvm-image={path}"), "damaged qcow2")


def test_bad_marker_argument_is_a_usage_error(pytester: pytest.Pytester):
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.kvm(memroy=512)
        def test_x(kvm_guest):
            pass
        """
    )
    assert_usage_error(pytester.runpytest(), "unknown argument memroy=")


def test_bad_marker_value_is_a_usage_error(pytester: pytest.Pytester):
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.kvm(cpus="two")
        def test_x(kvm_guest):
            pass
        """
    )
    assert_usage_error(pytester.runpytest(), "@pytest.mark.kvm cpus=", "'two'")


def test_missing_qemu_skips_with_the_package_name(pytester: pytest.Pytester, tmp_path):
    image = make_qcow2(pytester.path / "a.qcow2")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "qemu-img").symlink_to(
        subprocess.check_output(["which", "qemu-img"]).decode().strip()
    )
    pytester.makepyfile(GUEST_TEST)
    env = {**os.environ, "PATH": str(bindir)}
    proc = subprocess.run(
        [
            os.sys.executable,
            "-m",
            "pytest",
            "-rs",
            f"--kvm-image={image}",
            "-p",
            "no:cacheprovider",
        ],
        cwd=pytester.path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert "qemu-system-x86_64 is not installed (Debian package: qemu-system-x86)" in proc.stdout
    assert "1 passed, 1 skipped" in proc.stdout


@pytest.mark.skipif(not kvm_problem(), reason="KVM works on this machine")
def test_forced_kvm_fails_clearly_where_it_cannot_work(pytester: pytest.Pytester):
    image = make_qcow2(pytester.path / "a.qcow2")
    pytester.makepyfile(GUEST_TEST)
    assert_usage_error(
        pytester.runpytest(f"--kvm-image={image}", "--kvm-accel=kvm"),
        "--kvm-accel kvm: KVM cannot run guests here",
    )


def test_header_reports_accelerator(pytester: pytest.Pytester):
    image = make_qcow2(pytester.path / "a.qcow2")
    pytester.makepyfile("def test_plain(): pass")
    result = pytester.runpytest(f"--kvm-image={image}")
    result.stdout.fnmatch_lines(
        ["pytest-kvm: images *a.qcow2; backend qemu; network user; accel *"]
    )


def test_the_error_gate_is_in_help_and_markers_and_leaves_guestless_tests_alone(
    pytester: pytest.Pytester,
):
    help_text = pytester.runpytest("--help").stdout.str()
    assert "--kvm-fail-on=LIST" in help_text and "journal-err" in help_text
    markers = pytester.runpytest("--markers").stdout.str()
    assert "@pytest.mark.kvm_allow(" in markers and "fail_on=" in markers
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.kvm(fail_on="oops")
        @pytest.mark.kvm_allow(r"x+")
        def test_plain():
            pass

        def test_plain_failure():
            assert False
        """
    )
    result = pytester.runpytest("--kvm-fail-on=panic,oops,coredump,journal-err")
    result.assert_outcomes(passed=1, failed=1)
    assert "kvm error gate" not in result.stdout.str()
