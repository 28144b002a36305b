"""The version is written once (pytest_kvm.__version__) and shown by the command."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import pytest

import pytest_kvm
from pytest_kvm import cli

ROOT = Path(__file__).resolve().parents[2]


def test_version_option_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"pytest-kvm {pytest_kvm.__version__}\n"


def test_the_installed_distribution_has_the_same_version():
    assert metadata.version("pytest-kvm") == pytest_kvm.__version__


def test_the_changelog_records_this_version_and_what_is_unreleased():
    headings = re.findall(r"^## (.+)$", (ROOT / "CHANGELOG.md").read_text(), re.MULTILINE)
    assert headings[0] == "Unreleased"
    assert any(h.startswith(f"{pytest_kvm.__version__} ") for h in headings), headings
