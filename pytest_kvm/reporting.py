"""What a test's report says about its guests, in one ``makereport`` in a fixed order:
report sections (resources, boot timings), --kvm-record's recorders stopped, then a
failed test's artifacts (console tail, the artifacts folder, pytest-html extras) and
its recordings, then keep-on-failure, last: the artifacts are read from the guest
before it is handed over to the user, running."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from . import artifacts, matrix, recording
from .config import Settings
from .console import tail
from .errors import KvmError
from .guest import Guest
from .session import guests_key, settings_key
from .vlan import Vlan

vlans_key = pytest.StashKey[list[Vlan]]()  # the test's kvm_vlan segments


class Reporting:
    """The makereport of pytest-kvm, and the summary of the guests it kept."""

    def __init__(self) -> None:
        self.kept: list[str] = []

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
        guests: list[Guest] = item.stash.get(guests_key, [])
        if call.when == "teardown":  # before the report is made: --junitxml reads its properties
            item.user_properties.extend(matrix.junit_properties(item, guests))
        report = yield
        settings = item.config.stash.get(settings_key, None)
        failed = report.failed and call.when in ("setup", "call")
        _add_sections(item, call, report, guests)
        if failed or call.when == "call":
            recording.stop(item)  # --kvm-record: before the artifacts and the teardown
        if failed:
            _add_artifacts(item, report, guests, settings)
            recording.keep(item, report, settings.artifacts if settings else None)
            _add_captures(item, report, settings)
        if failed and settings is not None and settings.keep_on_failure:
            for guest in guests:
                text = guest.keep()
                report.sections.append((f"kvm kept guest: {guest.name}", text))
                self.kept.append(text)
        return report

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.kept:
            terminalreporter.section("pytest-kvm: guests kept (--kvm-keep-on-failure)")
            for text in self.kept:
                terminalreporter.write_line(text)


def _add_sections(
    item: pytest.Item, call: pytest.CallInfo[None], report: Any, guests: Sequence[Guest]
) -> None:
    """Each guest's resource usage after the test; its boot timings with -v."""
    if call.when == "call":
        for guest in guests:
            usage = guest.resource_usage()
            if usage:
                report.sections.append((f"kvm resources: {guest.name}", usage))
    if item.config.option.verbose > 0 and (
        call.when == "call" or (call.when == "setup" and report.failed)
    ):
        for guest in guests:
            if guest.boot_timings:
                report.sections.append(artifacts.timings_section(guest.name, guest.boot_timings))


def _add_artifacts(
    item: pytest.Item, report: Any, guests: Sequence[Guest], settings: Settings | None
) -> None:
    """A failed test's guests: console tails, saved artifacts, pytest-html extras."""
    extras: list[Any] = []
    for guest in guests:
        if guest.workdir is None or not guest.serial_log.exists():
            continue
        console = tail(guest.serial_log, artifacts.CONSOLE_TAIL_LINES)
        report.sections.append((f"kvm console tail: {guest.name}", console))
        if settings is not None:
            saved = artifacts.save(
                guest,
                settings.artifacts,
                item.nodeid,
                # --kvm-pause-on-failure: the user reaches the guest next, running.
                keep_running=settings.keep_on_failure or settings.pause_on_failure,
            )
            report.sections.append((f"kvm artifacts: {guest.name}", str(saved)))
            extras += artifacts.html_extras(item.config, guest.name, saved, console)
    if extras:  # pytest-html shows them (its report.extras)
        report.extras = [*getattr(report, "extras", []), *extras]


def _add_captures(item: pytest.Item, report: Any, settings: Settings | None) -> None:
    """A failed test's kvm_vlan segments: each one's traffic, ``<artifacts>/<test>/NAME.pcap``
    (the vlan writes all of it there when it closes; passed tests' captures are deleted)."""
    if settings is None:
        return
    for vlan in item.stash.get(vlans_key, []):
        if vlan.capture_path is None:
            continue
        dest = artifacts.folder_for(settings.artifacts, item.nodeid, f"{vlan.name}.pcap")
        try:
            vlan.keep_capture(dest)
        except (KvmError, OSError) as exc:
            report.sections.append((f"kvm vlan capture: {vlan.name}", f"not saved: {exc}"))
            continue
        impaired = "; ".join(f"{k}: {v}" for k, v in vlan.impairments().items())
        text = f"{dest} ({vlan.capture_note()}; seed {vlan.seed!r})"
        report.sections.append((f"kvm vlan capture: {vlan.name}", text))
        if impaired:
            report.sections.append((f"kvm vlan impairments: {vlan.name}", impaired))
