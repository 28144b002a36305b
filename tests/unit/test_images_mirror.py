"""Finding the Debian mirror in apt's sources (temp files only, no network)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_kvm.errors import KvmConfigError
from pytest_kvm.images.mirror import MIRROR_ENV, debian_mirror


def apt_dir(tmp_path: Path, sources_list: str | None = None, **parts: str) -> Path:
    root = tmp_path / "apt"
    (root / "sources.list.d").mkdir(parents=True)
    if sources_list is not None:
        (root / "sources.list").write_text(sources_list)
    for name, text in parts.items():
        (root / "sources.list.d" / name.replace("__", ".")).write_text(text)
    return root


DEB822_BOOKWORM = """\
Types: deb
# a comment inside the stanza
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main
"""


def test_deb822_sources_file(tmp_path: Path) -> None:
    apt = apt_dir(tmp_path, debian__sources=DEB822_BOOKWORM)
    assert debian_mirror(environ={}, apt_dir=apt) == "http://mirror.example/debian"


def test_one_line_sources_list_with_options(tmp_path: Path) -> None:
    apt = apt_dir(
        tmp_path,
        "# deb http://commented.example/debian bookworm main\n"
        "deb-src http://src.example/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://one.example/debian/ bookworm main\n",
    )
    assert debian_mirror(environ={}, apt_dir=apt) == "http://one.example/debian"


def test_security_and_foreign_entries_are_skipped(tmp_path: Path) -> None:
    apt = apt_dir(
        tmp_path,
        "deb http://sec.example/debian-security bookworm-security main\n"
        "deb https://vendor.example/apt cloud-sdk main\n"
        "deb http://ubuntu.example/ubuntu jammy main\n",
        z__list="deb http://later.example/debian bookworm main\n",
    )
    assert debian_mirror(environ={}, apt_dir=apt) == "http://later.example/debian"


def test_suite_codename_is_enough_when_path_is_not_debian(tmp_path: Path) -> None:
    apt = apt_dir(tmp_path, "deb http://cache.local:3142/deb trixie main\n")
    assert debian_mirror(environ={}, apt_dir=apt) == "http://cache.local:3142/deb"


def test_sources_list_comes_before_parts_and_parts_in_name_order(tmp_path: Path) -> None:
    apt = apt_dir(
        tmp_path,
        None,
        b__list="deb http://b.example/debian bookworm main\n",
        a__sources=DEB822_BOOKWORM.replace("mirror.example", "a.example"),
    )
    assert debian_mirror(environ={}, apt_dir=apt) == "http://a.example/debian"
    (apt / "sources.list").write_text("deb http://main.example/debian sid main\n")
    assert debian_mirror(environ={}, apt_dir=apt) == "http://main.example/debian"


def test_disabled_stanzas_and_other_suffixes_are_ignored(tmp_path: Path) -> None:
    apt = apt_dir(
        tmp_path,
        None,
        a__sources="Enabled: no\nTypes: deb\nURIs: http://off.example/debian\nSuites: bookworm\n",
        b__list__disabled="deb http://nope.example/debian bookworm main\n",
        c__sources="Types: deb-src deb\nURIs: http://on.example/debian\nSuites: bookworm\n",
    )
    assert debian_mirror(environ={}, apt_dir=apt) == "http://on.example/debian"


def test_environment_overrides(tmp_path: Path) -> None:
    apt = apt_dir(tmp_path, "deb http://one.example/debian bookworm main\n")
    env = {MIRROR_ENV: "http://override.example/debian/"}
    assert debian_mirror(environ=env, apt_dir=apt) == "http://override.example/debian"
    assert debian_mirror(environ={MIRROR_ENV: "file:///srv/debian"}, apt_dir=apt) == (
        "file:///srv/debian"
    )


def test_bad_override_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(KvmConfigError, match=MIRROR_ENV):
        debian_mirror(environ={MIRROR_ENV: "mirror.example/debian"}, apt_dir=tmp_path)


def test_nothing_found_is_a_config_error_that_says_what_to_do(tmp_path: Path) -> None:
    apt = apt_dir(tmp_path, "deb http://sec.example/debian-security bookworm-security main\n")
    with pytest.raises(KvmConfigError) as info:
        debian_mirror(environ={}, apt_dir=apt)
    assert MIRROR_ENV in str(info.value)
    assert "sources.list" in str(info.value)


def test_missing_apt_directory(tmp_path: Path) -> None:
    with pytest.raises(KvmConfigError):
        debian_mirror(environ={}, apt_dir=tmp_path / "nothing")
