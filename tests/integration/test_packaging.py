"""pytest-kvm as a user gets it: built into a wheel and an sdist, the wheel installed
into a fresh virtualenv outside the checkout, used from a directory outside it.

The catalog recipes and every other file the package reads at run time must travel
in both archives (a wheel without them listed no catalog: issue 23). The build runs
on a copy of the source tree, so that the checkout gets no build/ or egg-info; pip
installs the dependencies from its cache or the package index.
"""

from __future__ import annotations

import email.parser
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

import pytest_kvm
from pytest_kvm.images.recipe import (
    RECIPES_ENV,
    catalog_names,
    download_names,
    load_download,
    load_recipe,
)
from tests.support.processes import qemu_pids_under

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "pytest_kvm"
EXTRAS = {"libvirt", "xdist", "testinfra", "html"}
# Environment of this run that must not reach the user's commands: they would find the
# checkout (PYTHONPATH), another catalog, or this run's pytest options and xdist worker.
LEAKY_ENV = ("PYTHONPATH", "PYTEST_ADDOPTS", "PYTEST_PLUGINS", "VIRTUAL_ENV", "PYTEST_KVM_RECIPES")
# What not to copy: build output and caches (the build must not depend on them).
NOT_SOURCE = (".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", ".pytest-kvm",
              ".mypy_cache", ".ruff_cache", ".pytest_cache")  # fmt: skip


@pytest.fixture
def checkout_catalog(monkeypatch: pytest.MonkeyPatch) -> tuple[list[str], list[str]]:
    """The names of the checkout's catalog: (built images, downloaded images)."""
    monkeypatch.delenv(RECIPES_ENV, raising=False)
    built, cloud = catalog_names(), download_names()
    assert "debian-12" in built and "ubuntu-24.04" in cloud
    return built, cloud


def runtime_files() -> set[str]:
    """What the package reads at run time, repo-relative: every file under pytest_kvm/
    (modules, py.typed) and the catalog files the checkout's package loads."""
    files = {p for p in PACKAGE.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    files |= {load_recipe(name).path for name in catalog_names()}
    files |= {load_download(name).path for name in download_names()}
    return {p.relative_to(ROOT).as_posix() for p in files}


def user_env(venv: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LEAKY_ENV}
    env = {k: v for k, v in env.items() if not k.startswith(("PYTEST_XDIST", "PYTEST_CURRENT"))}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def run(argv: list[str | Path], cwd: Path, env: dict[str, str], timeout: float) -> str:
    proc = subprocess.run(
        [str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
    return proc.stdout


@dataclass(frozen=True)
class Installed:
    sdist: Path
    wheel: Path
    venv: Path
    outside: Path  # a directory outside the checkout, the user's working directory
    env: dict[str, str]

    def cli(self, *args: str, timeout: float = 120) -> str:
        return run([self.venv / "bin" / "pytest-kvm", *args], self.outside, self.env, timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    base = tmp_path_factory.mktemp("packaging")
    assert ROOT not in base.parents
    source, dist, venv, outside = (base / n for n in ("source", "dist", "venv", "outside"))
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    outside.mkdir()
    env = user_env(venv)
    # sdist first, then the wheel from the unpacked sdist: the sdist alone must build it.
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, source],
        base, env, 300)  # fmt: skip
    (sdist,) = dist.glob("*.tar.gz")
    (wheel,) = dist.glob("*.whl")
    # The base interpreter's venv, not this one's: it sees Debian's python3-guestfs only.
    # Without a pip of its own (ensurepip costs ~18 s): this run's pip installs into it.
    run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv],
        base, env, 120)  # fmt: skip
    run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q",
         "--no-compile", wheel], outside, env, 600)  # fmt: skip
    return Installed(sdist, wheel, venv, outside, env)


def test_sdist_and_wheel_carry_every_runtime_file(installed: Installed, checkout_catalog):
    with tarfile.open(installed.sdist) as tar:
        in_sdist = {name.partition("/")[2] for name in tar.getnames()}
    with zipfile.ZipFile(installed.wheel) as whl:
        in_wheel = set(whl.namelist())
    expected = runtime_files()
    assert {f for f in expected if f.endswith(("/debian-12.toml", "/ubuntu-24.04.toml"))}
    assert sorted(expected - in_sdist) == []
    assert sorted(expected - in_wheel) == []
    assert {"README.md", "CHANGELOG.md", "pyproject.toml"} <= in_sdist


def test_wheel_metadata_has_the_version_and_the_extras(installed: Installed):
    version = pytest_kvm.__version__
    assert installed.wheel.name.startswith(f"pytest_kvm-{version}-")
    with zipfile.ZipFile(installed.wheel) as whl:
        meta = whl.read(f"pytest_kvm-{version}.dist-info/METADATA").decode()
    msg = email.parser.Parser().parsestr(meta)
    assert msg["Version"] == version
    assert set(msg.get_all("Provides-Extra") or []) >= EXTRAS | {"dev"}
    requires = msg.get_all("Requires-Dist") or []
    for extra, dist in (("libvirt", "libvirt-python"), ("xdist", "pytest-xdist"),
                        ("testinfra", "pytest-testinfra"), ("html", "pytest-html")):  # fmt: skip
        assert any(r.startswith(dist) and f'extra == "{extra}"' in r for r in requires), requires


def test_installed_package_is_the_wheel_not_the_checkout(installed: Installed):
    where = run([installed.venv / "bin" / "python", "-c",
                 "import pytest_kvm; print(pytest_kvm.__file__)"],
                installed.outside, installed.env, 60)  # fmt: skip
    assert Path(where.strip()).is_relative_to(installed.venv), where
    assert installed.cli("--version") == f"pytest-kvm {pytest_kvm.__version__}\n"


def test_installed_cli_lists_the_whole_catalog(
    installed: Installed, checkout_catalog: tuple[list[str], list[str]], tmp_path: Path
):
    out = installed.cli("--cache", str(tmp_path / "cache"), "image", "list")
    rows = {line.split()[0]: line for line in out.splitlines()[1:] if line.strip()}
    built, cloud = checkout_catalog
    for name in built:
        assert re.search(r" recipe (\S+)$", rows.get(name, "")), out
        recipe = Path(rows[name].rsplit(" recipe ", 1)[1])
        assert recipe.is_relative_to(installed.venv) and recipe.is_file(), rows[name]
    for name in cloud:
        assert " download " in rows.get(name, ""), out


def test_installed_doctor_quick_passes(installed: Installed, cache_arg: str):
    cache = cache_arg.partition("=")[2]
    out = installed.cli("--cache", cache, "doctor", "--quick", timeout=300)
    assert "the default mode works here: pytest --kvm-image debian-12" in out
    assert "recipe is missing" not in out
    lines = out.splitlines()
    for extra, dist in (("xdist", "pytest-xdist"), ("testinfra", "pytest-testinfra"),
                        ("html", "pytest-html")):  # fmt: skip
        (i,) = [n for n, line in enumerate(lines) if line[5:].startswith(f"{dist} (optional")]
        if lines[i].startswith("[--]"):  # a fresh venv lacks it: the doctor names the extra
            assert lines[i + 1] == f"     install: pip install 'pytest-kvm[{extra}]'"


def test_a_user_suite_outside_the_checkout_gets_a_guest(
    installed: Installed, image_arg: str, cache_arg: str, inner_env: Path, tmp_path: Path
):
    suite = tmp_path / "user-suite"
    suite.mkdir()
    (suite / "test_user.py").write_text(
        "def test_guest_runs_a_command(kvm_guest):\n"
        "    assert kvm_guest.succeed('echo from-the-guest') == 'from-the-guest\\n'\n"
        "    assert 'ID=debian' in kvm_guest.succeed('cat /etc/os-release')\n"
    )
    env = dict(installed.env, PYTEST_KVM_RUNTIME_DIR=str(inner_env))
    pytest_bin = installed.venv / "bin" / "pytest"
    out = run([pytest_bin, "-p", "no:cacheprovider", "-v", "--kvm-image", image_arg, cache_arg],
              suite, env, 900)  # fmt: skip
    passed = re.compile(r"^test_user\.py::test_guest_runs_a_command\[\S+\] PASSED", re.M)
    assert passed.search(out), out
    assert "1 passed" in out, out
    assert f"rootdir: {suite}" in out, out
    assert qemu_pids_under(inner_env) == []
