"""Top-level conftest: pytester for the plugin's own tests."""

from __future__ import annotations

import os
from collections.abc import Generator
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

# An inner test (pytester run of a suite with real guests) that takes this long is stuck:
# its threads' stacks go to the inner stderr, which a failure report below shows.
INNER_STACK_DUMP_AFTER = 600


@pytest.fixture(autouse=True)
def _inner_stack_dumps(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if "pytester" not in request.fixturenames:
        return
    request.getfixturevalue("pytester")  # it clears PYTEST_ADDOPTS: set ours after that
    # The suite itself runs under xdist (scripts/test.sh): an inner run is a run of
    # its own, not one of this worker's (pytest-kvm names runs after the worker).
    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
        monkeypatch.delenv(name, raising=False)
    addopts = os.environ.get("PYTEST_ADDOPTS", "")
    option = f"-o faulthandler_timeout={INNER_STACK_DUMP_AFTER}"
    monkeypatch.setenv("PYTEST_ADDOPTS", f"{addopts} {option}".strip())


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test that ran an inner pytest shows the end of that run's output, which
    pytester keeps in files (a timed-out run's output is otherwise lost)."""
    report = yield
    pytester = getattr(item, "funcargs", {}).get("pytester")
    if report.failed and call.when == "call" and pytester is not None:
        for name, lines in (("stdout", 150), ("stderr", 150)):
            text = _tail(pytester.path / name, lines)
            if text.strip():
                report.sections.append((f"inner run {name} (last {lines} lines)", text))
    return report
