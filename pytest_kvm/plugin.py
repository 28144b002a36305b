"""pytest entry point: options, marker, hooks and fixtures. Thin: the work is elsewhere."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from . import accel, artifacts, gate, matrix, pause, recording
from .backends import load_backend
from .config import OPTIONS, Settings, resolve
from .errors import ImageError, KvmConfigError, KvmError, KvmUnavailable
from .guest import Guest
from .imagearch import catalog_arch_refusal
from .images import Image
from .images.store import check_encryption, classify
from .media import AnswerServer
from .reaper import reap
from .reporting import Reporting, vlans_key
from .request import (
    FACTORY_SIGNATURE,
    GUEST_FIXTURES,
    GuestRequest,
    SpecChecks,
    marker_settings,
    marker_snapshot,
)
from .session import (
    KvmSession,
    TestGuests,
    guests_key,
    handovers_key,
    settings_key,
    spec_checks_key,
)
from .snapshot import Snapshot, define
from .vlan import Vlan

__all__ = ["GUEST_FIXTURES", "settings_key"]  # settings_key: tests and conftests read it
_vlan_numbers = itertools.count(1)
collect_errors_key = pytest.StashKey[list[str]]()
dist_note_key = pytest.StashKey[str]()
_FLAGS = ("snapshot", "keep_on_failure", "pause_on_failure", "record", "vnc", "tpm", "offline")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("kvm", "pytest-kvm: disposable QEMU/KVM guests")
    group.addoption(
        "--kvm-image",
        action="append",
        dest="kvm_image",
        metavar="IMAGE",
        help="base image: a qcow2/raw path or a catalog name (debian-12); repeatable",
    )
    parser.addini("kvm_image", "default --kvm-image values", type="linelist")
    group.addoption(
        "--kvm-dist-by-image", action="store_true", dest=matrix.DIST_OPTION, default=None,
        help=matrix.DIST_HELP,
    )  # fmt: skip
    parser.addini(matrix.DIST_OPTION, matrix.DIST_HELP)
    for opt in OPTIONS.values():
        dest = "kvm_" + opt.name
        if opt.name == "uri":
            group.addoption(opt.flag, action="append", dest=dest, default=None,
                            metavar=opt.metavar, help=opt.help)  # fmt: skip
        elif opt.name in _FLAGS:
            group.addoption(opt.flag, action="store_true", dest=dest, default=None, help=opt.help)
            if opt.name == "snapshot":
                group.addoption(
                    "--kvm-no-snapshot",
                    action="store_false",
                    dest=dest,
                    help="boot every guest for real",
                )
        else:
            group.addoption(opt.flag, dest=dest, metavar=opt.metavar, default=None, help=opt.help)
        parser.addini(opt.ini, opt.help)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "kvm(image=, memory=, cpus=, network=, snapshot=, kernel_args=, fail_on=, tpm=, "
        "files=, hostname=, run=, share=): override pytest-kvm settings for a test, class or "
        "module; files/hostname/run customise the disk with libguestfs before the guest boots; "
        "share={host folder: guest path} mounts host folders (virtio-9p)",
    )
    config.addinivalue_line("markers", matrix.SKIP_MARKER_HELP)
    config.addinivalue_line("markers", gate.ALLOW_HELP)
    cli = {name: config.getoption("kvm_" + name) for name in OPTIONS}
    cli["image"] = config.getoption("kvm_image")
    try:
        settings = resolve(cli, os.environ, config.getini)
        specs = config.stash[spec_checks_key] = SpecChecks()
        for spec in settings.images:
            specs.check(spec, settings.image_source)
            refused = catalog_arch_refusal(spec, settings.arch, settings.arch_source)
            if refused:  # a catalog image of another architecture than --kvm-arch
                raise KvmConfigError(refused)
            if classify(spec) == "path":  # an encrypted image needs its key, now
                try:
                    check_encryption(Path(spec).expanduser(), spec, settings.image_secret)
                except (KvmConfigError, ImageError) as exc:  # say where the image was named
                    raise KvmConfigError(f"{settings.image_source}: {exc}") from None
        if settings.images and settings.accel == "kvm":
            accel.choose("kvm")  # fails now, with the reason, rather than in every test
        if settings.images and settings.backend == "libvirt":
            check_libvirt(settings)  # a bad URI or pool fails the run now, once
        config.stash[dist_note_key] = matrix.configure_dist(config, settings.images)
        pause.check(config, settings)
    except (KvmConfigError, ImageError, KvmUnavailable) as exc:
        raise pytest.UsageError(f"pytest-kvm: {exc}") from None
    config.stash[settings_key] = settings
    config.pluginmanager.register(_Lifecycle(config), "pytest-kvm-lifecycle")
    config.pluginmanager.register(Reporting(), "pytest-kvm-reporting")
    if settings.pause_on_failure:
        config.pluginmanager.register(pause.Pause(), "pytest-kvm-pause")
    config.pluginmanager.register(gate.ErrorGate(), "pytest-kvm-error-gate")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that pytest tears down as on Ctrl-C."""


class _Lifecycle:
    """Run-level cleanup: SIGTERM tears down like Ctrl-C; the xdist controller reaps
    what dead workers left. (Keep-on-failure is in reporting.)"""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self._old_handler: Any = None
        if threading.current_thread() is threading.main_thread() and (
            signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        ):
            self._old_handler = signal.signal(signal.SIGTERM, self._terminate)

    @staticmethod
    def _terminate(signum: int, frame: Any) -> None:
        raise Terminated(f"pytest-kvm: got signal {signum} (SIGTERM): tearing down guests")

    def pytest_unconfigure(self) -> None:
        if self._old_handler is not None:
            signal.signal(signal.SIGTERM, self._old_handler)
            self._old_handler = None

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if hasattr(self.config, "workerinput"):
            return
        if self.config.pluginmanager.has_plugin("dsession"):
            # The xdist controller: a worker that was killed left its guests' files.
            with contextlib.suppress(KvmError):
                reap()


def check_libvirt(settings: Settings) -> None:
    """Connect to the libvirt URI and find the pool: clear errors naming the URI."""
    load_backend(settings.backend, settings).check()


def pytest_report_header(config: pytest.Config) -> list[str]:
    settings = config.stash.get(settings_key, None)
    if settings is None or not settings.images:
        return ["pytest-kvm: no --kvm-image given; guest tests will be skipped"]
    try:
        choice = accel.choose(settings.accel)
    except KvmConfigError as exc:
        return [f"pytest-kvm: {exc}"]
    lines = [
        f"pytest-kvm: images {', '.join(settings.images)}; backend {settings.backend}; "
        f"network {settings.network}; accel {choice.name}"
    ]
    if choice.warning:
        lines.append(choice.warning)
    if config.stash.get(dist_note_key, ""):
        lines.append(config.stash[dist_note_key])
    if settings.keep_on_failure:
        lines.append(
            "pytest-kvm: --kvm-keep-on-failure: a failed test's guests stay running "
            "(qemu backend); `pytest-kvm reap` ends them"
        )
    return lines


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if not any(name in metafunc.fixturenames for name in GUEST_FIXTURES):
        return
    base = metafunc.config.stash[settings_key]
    try:
        settings = marker_settings(metafunc.definition, base)
        skips = matrix.skipped_images(metafunc.definition)
        where = f"{metafunc.definition.nodeid} (@pytest.mark.kvm image=)"
        for spec in settings.images:
            metafunc.config.stash[spec_checks_key].check(spec, where)
    except (KvmConfigError, ImageError, KvmUnavailable) as exc:
        # Raised from pytest_collection_modifyitems, where a UsageError ends the run cleanly.
        metafunc.config.stash.setdefault(collect_errors_key, []).append(str(exc))
        return
    if settings.images:
        # Ids are image_name(spec); images the test's kvm_skip_image names skip there.
        params = matrix.image_params(settings.images, skips)
        metafunc.parametrize("kvm_image", params, indirect=True, scope="function")


@pytest.fixture(scope="session")
def _kvm_session(request: pytest.FixtureRequest) -> Iterator[KvmSession]:
    session = KvmSession(request.config)
    try:
        yield session
    finally:
        session.close()


@pytest.fixture
def kvm_image(request: pytest.FixtureRequest, _kvm_session: KvmSession) -> Image:
    """The current base image (parametrized over ``--kvm-image``)."""
    spec = getattr(request, "param", None)
    if spec is None:
        pytest.skip("pytest-kvm: no --kvm-image given (e.g. --kvm-image debian-12)")
    try:
        return _kvm_session.image(spec)
    except KvmUnavailable as exc:
        pytest.skip(f"pytest-kvm: {exc}")


GuestFactory = Callable[..., Guest]


@pytest.fixture
def kvm_guest_factory(
    request: pytest.FixtureRequest, kvm_image: Image, _kvm_session: KvmSession
) -> Iterator[GuestFactory]:
    """``factory(image=None, network=None, memory=None, cpus=None, name=None, ...)``."""
    settings = marker_settings(request.node, _kvm_session.settings)
    guests = TestGuests(
        _kvm_session, settings, kvm_image, request.node.nodeid, marker_snapshot(request.node)
    )
    request.node.stash[guests_key] = guests.started
    recordings = recording.Recordings() if settings.record else None
    request.node.stash[recording.recordings_key] = recordings
    request.node.stash[handovers_key] = guests.handed_over
    try:
        yield _factory(guests, recordings)
    finally:
        try:
            if recordings is not None:
                recordings.close()
        finally:
            guests.close()


def _factory(guests: TestGuests, recordings: recording.Recordings | None) -> GuestFactory:
    """``guests.start`` as a function whose ``help()`` shows the factory's arguments;
    with --kvm-record, each guest's recording starts as it is handed over."""

    def factory(*args: Any, **kwargs: Any) -> Guest:
        __tracebackhide__ = True
        guest = guests.start(*args, **kwargs)
        if recordings is not None:
            recordings.add(guest)
        return guest

    factory.__signature__ = FACTORY_SIGNATURE  # type: ignore[attr-defined]
    factory.__doc__ = GuestRequest.build.__doc__
    return factory


@pytest.fixture
def kvm_http() -> Iterator[AnswerServer]:
    """Answer files (preseed, autoinstall, kickstart) over HTTP for this test's guests:
    ``url = kvm_http.serve("preseed.cfg", text)`` is the URL a guest on user networking
    uses; the server listens on 127.0.0.1 only and stops after the test."""
    server = AnswerServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def kvm_vlan(request: pytest.FixtureRequest, _kvm_session: KvmSession) -> Iterator[Vlan]:
    """A private layer-2 segment for this test's guests: ``kvm_guest_factory(vlan=...)``.

    Rootless (QEMU dgram sockets and a switch in this process); every guest on it gets
    a static address, ``kvm_vlan.address_of(guest)``, in 192.168.76.0/24.
    ``impair(guest, delay_ms=, jitter_ms=, loss=, duplicate=)``, ``partition([a], [b])``
    and ``heal()`` disturb it, seeded by the test's node id; a failed test keeps its
    traffic as ``<artifacts>/<test>/vlanN.pcap``."""
    try:
        run = _kvm_session.run
    except KvmUnavailable as exc:
        pytest.skip(f"pytest-kvm: {exc}")
    number = next(_vlan_numbers)
    vlan = Vlan(f"vlan{number}", run.sock_dir / f"vlan{number}", seed=request.node.nodeid)
    request.node.stash.setdefault(vlans_key, []).append(vlan)
    with vlan:
        yield vlan


@pytest.fixture(scope="session")
def kvm_snapshot() -> Callable[..., Snapshot]:
    """``kvm_snapshot(name, setup, *, image=None, inputs=(), memory=, cpus=)``: a prepared
    snapshot, for ``kvm_guest_factory(image=...)``. ``setup(guest)`` runs once per base
    (the test's image, or ``image=``) in a guest with the network up; its result is
    saved as a template chained on the base's, and reused until the base, the name,
    setup's source or an input file's contents change. Nothing starts until a guest
    asks for it. (At module level, for a marker: ``pytest_kvm.snapshot.define``.)"""
    return define


@pytest.fixture
def kvm_guest(kvm_guest_factory: GuestFactory) -> Guest:
    """A started guest, SSH-ready, destroyed after the test."""
    return kvm_guest_factory()


def pytest_sessionstart(session: pytest.Session) -> None:
    if session.config.option.verbose > 0:  # -v: boot phase timings under each test
        session.config.pluginmanager.register(
            artifacts.BootTimingsReporter(session.config), "pytest-kvm-boot-timings"
        )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    errors = config.stash.get(collect_errors_key, [])
    if errors:
        raise pytest.UsageError(f"pytest-kvm: {errors[0]}")
    settings = config.stash.get(settings_key, None)
    if settings is None:
        return
    for item in items:
        try:
            if item.get_closest_marker(matrix.SKIP_MARKER) is not None:
                matrix.skipped_images(item)  # also on tests that start no guest
            if item.get_closest_marker("kvm") is not None:
                marker_settings(item, settings)
            if item.get_closest_marker(gate.ALLOW_MARKER) is not None:
                gate.allowed(item)
        except KvmError as exc:
            raise pytest.UsageError(f"pytest-kvm: {exc}") from None
