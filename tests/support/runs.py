"""Checks on the result of an inner pytest run (pytester)."""

from __future__ import annotations

import pytest


def assert_usage_error(result: pytest.RunResult, *needles: str) -> None:
    """The run stopped with a usage error whose stderr has every needle, and no traceback."""
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    for needle in needles:
        assert needle in err, err
    assert "Traceback" not in err + result.stdout.str()
