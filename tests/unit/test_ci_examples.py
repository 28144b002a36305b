"""The CI examples of README "CI matrices" are valid YAML and run what the README says."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_kvm.images.recipe import catalog_names

ROOT = Path(__file__).resolve().parents[2]
CI = ROOT / "examples" / "ci"
CATALOG = "pytest_kvm/images/catalog"  # the recipes the cache keys hash
EXAMPLES = sorted(CI.glob("*.yml"))


def test_examples_exist():
    assert {p.name for p in EXAMPLES} >= {"github-actions.yml", "gitlab-ci.yml"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_plain_text_rules(path: Path):
    text = path.read_text()
    assert "\t" not in text  # YAML forbids tabs for indentation
    assert "--junitxml" in text and "--kvm-image" in text
    assert "PYTEST_KVM_CACHE" in text


def _commands(steps: list[dict]) -> list[str]:
    return [step["run"] for step in steps if "run" in step]


def test_github_actions_workflow():
    yaml = pytest.importorskip("yaml")
    workflow = yaml.safe_load((CI / "github-actions.yml").read_text())
    assert workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true
    jobs = workflow["jobs"]
    assert set(jobs) == {"per-image", "one-job"}
    images = jobs["per-image"]["strategy"]["matrix"]["image"]
    assert len(images) >= 2 and set(images) <= set(catalog_names())
    for job in jobs.values():
        assert job["container"]["image"] == "debian:12"
        steps = job["steps"]
        cache = next(s for s in steps if str(s.get("uses", "")).startswith("actions/cache@"))
        assert cache["with"]["path"].endswith("/images")
        assert f"hashFiles('{CATALOG}/**')" in cache["with"]["key"]
        assert (ROOT / CATALOG / "debian-12.toml").is_file()
        tests = [c for c in _commands(steps) if c.startswith(".venv/bin/pytest ")]
        assert len(tests) == 1 and "--junitxml=" in tests[0]
        upload = next(s for s in steps if str(s.get("uses", "")).startswith("actions/upload"))
        assert upload["if"] == "always()"
    per_image = _commands(jobs["per-image"]["steps"])
    assert any("--kvm-image ${{ matrix.image }}" in c for c in per_image)
    (one,) = [c for c in _commands(jobs["one-job"]["steps"]) if c.startswith(".venv/bin/pytest ")]
    assert "-n 2 --kvm-dist-by-image" in one
    assert all(f"--kvm-image {image}" in one for image in images)


def test_gitlab_ci():
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((CI / "gitlab-ci.yml").read_text())
    job = config["guests"]
    (row,) = job["parallel"]["matrix"]
    assert set(row["KVM_IMAGE"]) <= set(catalog_names())
    keyed = job["cache"]["key"]["files"]
    assert all(f.startswith(f"{CATALOG}/") and (ROOT / f).is_file() for f in keyed), keyed
    assert len(job["cache"]["key"]["files"]) <= 2  # GitLab's limit
    assert job["artifacts"]["reports"]["junit"] == "junit-$KVM_IMAGE.xml"
    assert any('--kvm-image "$KVM_IMAGE"' in line for line in job["script"])
