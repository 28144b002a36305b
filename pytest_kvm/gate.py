"""The error gate (``--kvm-fail-on``): after each test's call, what its running guests
logged since they were handed to it (``guestlog``) fails a passing test, with the lines
as evidence; a test that failed anyway gets them as a report section.
``@pytest.mark.kvm_allow(r"regex", ...)`` excuses matching lines."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import pytest

from .errors import KvmConfigError
from .guestlog import EVIDENCE_LINES, Finding, check
from .request import marker_settings
from .session import guests_key, handovers_key, settings_key

ALLOW_MARKER = "kvm_allow"
ALLOW_HELP = (
    'kvm_allow(r"regex", ...): guest log lines (--kvm-fail-on) that the error gate '
    "excuses for this test, class or module (re.search on the line and its message)"
)
_sections_key = pytest.StashKey[list[tuple[str, str]]]()


def allowed(node: Any) -> list[re.Pattern[str]]:
    """The node's ``kvm_allow`` patterns, closest marker first; a bad one is a
    ``KvmConfigError`` naming the test and the value."""
    patterns: list[re.Pattern[str]] = []
    for marker in node.iter_markers(ALLOW_MARKER):
        where = f"{node.nodeid}: @pytest.mark.{ALLOW_MARKER}"
        if marker.kwargs or not marker.args:
            raise KvmConfigError(f"{where}: give one or more regular expressions, no keywords")
        for value in marker.args:
            if isinstance(value, re.Pattern):
                patterns.append(value)
                continue
            if not isinstance(value, str) or not value:
                raise KvmConfigError(f"{where}({value!r}): not a regular expression")
            try:
                patterns.append(re.compile(value))
            except re.error as exc:
                raise KvmConfigError(
                    f"{where}({value!r}): not a regular expression: {exc}"
                ) from None
    return patterns


def evidence(guest: str, kinds: frozenset[str], findings: Sequence[Finding]) -> str:
    """What a report says: the guest, the kinds looked for, the lines (at most
    ``EVIDENCE_LINES``), and how to excuse them."""
    lines = [
        f"pytest-kvm: guest {guest!r} logged errors during the test "
        f"(--kvm-fail-on {','.join(sorted(kinds))}):"
    ]
    for finding in findings[:EVIDENCE_LINES]:
        text = finding.line.replace("\n", "\n    ")
        lines.append(f"  {finding.kind}: {text}")
    if len(findings) > EVIDENCE_LINES:
        lines.append(f"  ... and {len(findings) - EVIDENCE_LINES} more")
    lines.append(
        'Expected? @pytest.mark.kvm_allow(r"REGEX") excuses matching lines; '
        "@pytest.mark.kvm(fail_on=...) or --kvm-fail-on chooses what fails."
    )
    return "\n".join(lines)


class ErrorGate:
    """Runs the gate at the end of each test's call phase (before its fixtures' teardown
    ends the guests), so that a failure it raises is the call's: artifacts,
    keep-on-failure and pause-on-failure treat it like any other failed call."""

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Any:
        try:
            result = yield
        except (Exception, pytest.fail.Exception):
            self._gate(item, failed=True)  # evidence as a section; the test's error stays
            raise
        failures = self._gate(item, failed=False)
        if failures:
            pytest.fail("\n".join(failures), pytrace=False)
        return result

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
        report = yield
        if call.when == "call":
            report.sections.extend(item.stash.get(_sections_key, []))
        return report

    @staticmethod
    def _gate(item: pytest.Item, failed: bool) -> list[str]:
        """The evidence texts that fail the test; sections for the report (the evidence
        when the test failed anyway, what could not be checked)."""
        guests = item.stash.get(guests_key, [])
        base = item.config.stash.get(settings_key, None)
        if not guests or base is None:
            return []
        kinds = marker_settings(item, base).fail_on
        if not kinds:
            return []
        allow = allowed(item)
        handovers = item.stash.get(handovers_key, {})
        failures, sections = [], []
        for guest in guests:
            handover = handovers.get(guest.name)
            if handover is None:  # never handed to the test (its start failed)
                continue
            verdict = check(guest, handover, kinds)
            findings = [f for f in verdict.findings if not f.excused(allow)]
            if findings:
                text = evidence(guest.name, kinds, findings)
                failures.append(text)
                if failed:
                    sections.append((f"kvm error gate: {guest.name}", text))
            elif verdict.note:
                sections.append((f"kvm error gate: {guest.name}", f"not checked: {verdict.note}"))
        item.stash[_sections_key] = sections
        return failures
