"""hostdebs: what goes into the guest's shell (quoted, the guest's apt config left
alone), the repository check, bad package lists; fetch_debs is used as it is once
its index exists (no host apt call)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from pytest_kvm import hostdebs
from pytest_kvm.hostdebs import GUEST_REPO, DebsFailed, fetch_debs, install_debs


class FakeGuest:
    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []

    def copy_from_host(self, source, target, timeout=300) -> None:
        self.calls.append(("copy", str(source), target))

    def succeed(self, cmd: str, timeout: float = 60) -> str:
        self.calls.append(("run", cmd))
        return ""


def test_install_copies_the_repo_and_uses_it_as_the_only_source(tmp_path: Path):
    (tmp_path / "Packages").write_text("")
    guest = FakeGuest()
    install_debs(guest, tmp_path, ["nginx", "it's"])
    assert ("copy", str(tmp_path), GUEST_REPO) in guest.calls
    runs = [c[1] for c in guest.calls if c[0] == "run"]
    install = next(r for r in runs if "install -y" in r)
    assert f"-o Dir::Etc::SourceList={GUEST_REPO}/local.list" in install
    assert f"-o Dir::Etc::SourceParts={GUEST_REPO}/parts" in install
    assert shlex.split(install)[-2:] == ["nginx", "it's"]
    assert "/etc/apt" not in " ".join(runs)  # the guest's own apt config is not touched
    assert runs[-1].startswith(f"rm -rf {GUEST_REPO} ")


def test_install_refuses_a_directory_without_an_index(tmp_path: Path):
    with pytest.raises(DebsFailed, match="not a repository made by fetch_debs"):
        install_debs(FakeGuest(), tmp_path, ["nginx"])


def test_fetch_uses_a_finished_repository_as_it_is(tmp_path: Path, monkeypatch):
    (tmp_path / "Packages").write_text("")
    monkeypatch.setattr(hostdebs, "_host", lambda *a: pytest.fail("host apt was called"))
    assert fetch_debs(["nginx"], tmp_path) == tmp_path


@pytest.mark.parametrize("packages", [[], [""], ["-o"]])
def test_fetch_refuses_bad_package_lists(tmp_path: Path, packages):
    with pytest.raises(DebsFailed, match="is not a list of package names"):
        fetch_debs(packages, tmp_path / "repo")


def test_a_missing_host_tool_is_named(tmp_path: Path):
    with pytest.raises(DebsFailed, match="no-such-tool-xyz is not installed on the host"):
        hostdebs._host(["no-such-tool-xyz"], tmp_path)
