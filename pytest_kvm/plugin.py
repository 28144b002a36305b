"""pytest entry point: options, marker, hooks and fixtures. Thin: the work is elsewhere."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import shutil
import signal
import socket
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from . import accel, artifacts, matrix
from .backends import backend_class, load_backend
from .backends.base import Backend
from .backends.qemu import QEMU_BINARY
from .config import CUSTOMIZE_KEYS, OPTIONS, Settings, resolve
from .console import tail
from .customize import Customization, customized_image, guestfs_available, probe_cloud_init
from .errors import ImageError, KvmConfigError, KvmError, KvmUnavailable
from .guest import Guest, GuestConfig
from .images import Image
from .images.kernel import BootFiles, boot_files
from .images.store import check_encryption, check_spec, classify
from .images.store import resolve as resolve_image
from .media import AnswerServer, check_boot_file
from .reaper import reap
from .run import RunContext
from .template import Shape, TemplateStore
from .vlan import Vlan

GUEST_FIXTURES = ("kvm_guest", "kvm_guest_factory", "kvm_image")
_vlan_numbers = itertools.count(1)
settings_key = pytest.StashKey[Settings]()
guests_key = pytest.StashKey[list[Guest]]()
collect_errors_key = pytest.StashKey[list[str]]()
dist_note_key = pytest.StashKey[str]()


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
        elif opt.name in ("snapshot", "keep_on_failure", "vnc", "offline"):
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
        "kvm(image=, memory=, cpus=, network=, snapshot=, kernel_args=, files=, hostname=, "
        "run=): override pytest-kvm settings for a test, class or module; files/hostname/run "
        "customise the disk with libguestfs before the guest boots",
    )
    config.addinivalue_line("markers", matrix.SKIP_MARKER_HELP)
    cli = {name: config.getoption("kvm_" + name) for name in OPTIONS}
    cli["image"] = config.getoption("kvm_image")
    try:
        settings = resolve(cli, os.environ, config.getini)
        for spec in settings.images:
            try:
                check_spec(spec)
                if classify(spec) == "path":  # an encrypted image needs its key, now
                    check_encryption(Path(spec).expanduser(), spec, settings.image_secret)
            except (KvmConfigError, ImageError) as exc:  # say where the image was named
                raise KvmConfigError(f"{settings.image_source}: {exc}") from None
        if settings.images and settings.accel == "kvm":
            accel.choose("kvm")  # fails now, with the reason, rather than in every test
        if settings.images and settings.backend == "libvirt":
            check_libvirt(settings)  # a bad URI or pool fails the run now, once
        config.stash[dist_note_key] = matrix.configure_dist(config, settings.images)
    except (KvmConfigError, ImageError, KvmUnavailable) as exc:
        raise pytest.UsageError(f"pytest-kvm: {exc}") from None
    config.stash[settings_key] = settings
    config.pluginmanager.register(_Lifecycle(config), "pytest-kvm-lifecycle")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that pytest tears down as on Ctrl-C."""


class _Lifecycle:
    """Run-level cleanup: SIGTERM tears down like Ctrl-C; a failed test's guests are
    kept with --kvm-keep-on-failure; the xdist controller reaps what dead workers left."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.kept: list[str] = []
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

    @pytest.hookimpl(wrapper=True, tryfirst=True)  # after the artifacts are saved
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
        report = yield
        settings = item.config.stash.get(settings_key, None)
        if (
            report.failed and call.when in ("setup", "call")
            and settings is not None and settings.keep_on_failure
        ):  # fmt: skip
            for guest in item.stash.get(guests_key, []):
                text = guest.keep()
                report.sections.append((f"kvm kept guest: {guest.name}", text))
                self.kept.append(text)
        return report

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if hasattr(self.config, "workerinput"):
            return
        if self.config.pluginmanager.has_plugin("dsession"):
            # The xdist controller: a worker that was killed left its guests' files.
            with contextlib.suppress(KvmError):
                reap()

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.kept:
            terminalreporter.section("pytest-kvm: guests kept (--kvm-keep-on-failure)")
            for text in self.kept:
                terminalreporter.write_line(text)


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


def _marker_settings(node: pytest.Item, base: Settings) -> Settings:
    settings = base
    # Farthest first, so the closest marker (function over class over module) wins.
    for marker in reversed(list(node.iter_markers("kvm"))):
        if marker.args:
            raise KvmConfigError(f"{node.nodeid}: @pytest.mark.kvm takes keyword arguments only")
        settings = settings.with_marker(marker.kwargs, node.nodeid)
    return settings


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if not any(name in metafunc.fixturenames for name in GUEST_FIXTURES):
        return
    base = metafunc.config.stash[settings_key]
    try:
        settings = _marker_settings(metafunc.definition, base)
        skips = matrix.skipped_images(metafunc.definition)
        for spec in settings.images:
            if spec not in base.images:
                try:
                    check_spec(spec)
                except (KvmConfigError, ImageError) as exc:
                    where = f"{metafunc.definition.nodeid} (@pytest.mark.kvm image=)"
                    raise KvmConfigError(f"{where}: {exc}") from None
    except (KvmConfigError, ImageError, KvmUnavailable) as exc:
        # Raised from pytest_collection_modifyitems, where a UsageError ends the run cleanly.
        metafunc.config.stash.setdefault(collect_errors_key, []).append(str(exc))
        return
    if settings.images:
        # Ids are image_name(spec); images the test's kvm_skip_image names skip there.
        params = matrix.image_params(settings.images, skips)
        metafunc.parametrize("kvm_image", params, indirect=True, scope="function")


@pytest.fixture(scope="session")
def _kvm_session(request: pytest.FixtureRequest) -> Iterator[_Session]:
    session = _Session(request.config)
    try:
        yield session
    finally:
        session.close()


class _Session:
    """Lazily made per-process state: accelerator choice, run dir and key, resolved images."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.settings = config.stash[settings_key]
        self._run: RunContext | None = None
        self._images: dict[str, Image] = {}
        self._templates: TemplateStore | None = None
        self._backend: Backend | None = None
        self._boot_files: dict[Path, BootFiles] = {}
        self._lock = threading.RLock()

    def progress(self, message: str) -> None:
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        capture = self.config.pluginmanager.get_plugin("capturemanager")
        if reporter is None:
            return
        if capture is not None:
            with capture.global_and_fixture_disabled():
                reporter.ensure_newline()
                reporter.write_line(message)
        else:
            reporter.write_line(message)

    @property
    def run(self) -> RunContext:
        with self._lock:  # guests may be started from several threads at once
            return self._make_run()

    def _make_run(self) -> RunContext:
        if self._run is None:
            if shutil.which(QEMU_BINARY) is None:
                raise KvmUnavailable(
                    f"{QEMU_BINARY} is not installed (Debian package: qemu-system-x86)"
                )
            choice = accel.choose(self.settings.accel)
            # What runs that died left (their processes are gone); live runs' guests
            # and kept guests are left alone.
            reap(progress=self.progress)
            self._run = RunContext(choice, progress=self.progress)
        return self._run

    def boot_files(self, image: Image) -> BootFiles:
        if image.path not in self._boot_files:
            force_tcg = self.run.accel.name != "kvm"
            self._boot_files[image.path] = boot_files(
                image, self.settings.cache, force_tcg, self.progress
            )
        return self._boot_files[image.path]

    @property
    def templates(self) -> TemplateStore:
        with self._lock:
            return self._template_store()

    def _template_store(self) -> TemplateStore:
        if self._templates is None:
            self._templates = TemplateStore(
                self.settings.cache / "templates", self.run, self.progress
            )
        return self._templates

    def image(self, spec: str) -> Image:
        with self._lock:
            if spec not in self._images:
                self._images[spec] = self._resolve(spec, self.settings.image_secret)
            return self._images[spec]

    def disk_image(self, path: Path) -> Image:
        """A guest's disk (what an installer wrote) as an image to boot: not cached by
        name, since each test's disks are its own; plain (installers' disks are)."""
        image = self._resolve(str(path), None)
        return dataclasses.replace(image, name=f"disk of {path.parent.name}")

    def _resolve(self, spec: str, secret: Path | None) -> Image:
        image = resolve_image(
            spec, self.settings.cache, self.progress, secret, offline=self.settings.offline
        )
        if classify(spec) == "path" and guestfs_available():
            # Without libguestfs an image is assumed to run cloud-init.
            has = probe_cloud_init(image, self.settings.cache, self.force_tcg)
            image = dataclasses.replace(image, cloud_init=has)
        return image

    @property
    def force_tcg(self) -> bool:
        return self.run.accel.name != "kvm"

    def customized(self, image: Image, custom: Customization) -> Image:
        """``image`` with ``custom`` applied before boot: a cached layer, built once."""
        return customized_image(image, custom, self.settings.cache, self.force_tcg, self.progress)

    def close(self) -> None:
        try:
            if self._run is not None:
                self._run.close()
        finally:
            if self._templates is not None:
                self._templates.close()
            self.backend.close()

    @property
    def backend(self) -> Backend:
        """The run's backend (made once, from the settings)."""
        with self._lock:
            if self._backend is None:
                self._backend = load_backend(self.settings.backend, self.settings)
            return self._backend


@pytest.fixture
def kvm_image(request: pytest.FixtureRequest, _kvm_session: _Session) -> Image:
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
    request: pytest.FixtureRequest, kvm_image: Image, _kvm_session: _Session
) -> Iterator[GuestFactory]:
    """``factory(image=None, network=None, memory=None, cpus=None, name=None, ...)``."""
    settings = _marker_settings(request.node, _kvm_session.settings)
    started: list[Guest] = []
    request.node.stash[guests_key] = started

    def factory(
        image: str | Image | None = None,
        network: str | Vlan | None = None,
        memory: int | None = None,
        cpus: int | None = None,
        name: str | None = None,
        cdrom: str | os.PathLike[str] | None = None,
        disk_size: int | str | None = None,
        boot: str = "disk",
        ssh: bool = True,
        hostname: str | None = None,
        vlan: Vlan | Sequence[Vlan] | None = None,
        customize: Customization | Mapping[str, Any] | None = None,
        disk: str | os.PathLike[str] | None = None,
        kernel: str | os.PathLike[str] | None = None,
        initrd: str | os.PathLike[str] | None = None,
        append: str = "",
        display: bool = False,
    ) -> Guest:
        __tracebackhide__ = True
        where = f"{request.node.nodeid}: kvm_guest_factory"
        if disk is not None and image is not None:
            raise KvmConfigError(f"{where}: disk= boots that disk; image= is not needed")
        if disk is not None and not Path(disk).is_file():
            raise KvmConfigError(f"{where}: disk={str(disk)!r} does not exist")
        kernel_path = check_boot_file(Path(kernel), "kernel") if kernel is not None else None
        initrd_path = check_boot_file(Path(initrd), "initrd") if initrd is not None else None
        if not isinstance(append, str):
            raise KvmConfigError(f"{where}: append= takes the kernel command line as a string")
        # Installers start on an empty disk: from install media, or a network-boot
        # style kernel, unless disk= says which disk.
        blank = disk is None and (boot == "cdrom" or kernel is not None)
        custom = settings.customize
        if isinstance(customize, Customization):
            custom = custom.merged(customize)
        elif isinstance(customize, Mapping):
            unknown = set(customize) - set(CUSTOMIZE_KEYS)
            if unknown:
                raise KvmConfigError(
                    f"{where}: customize= takes {', '.join(CUSTOMIZE_KEYS)}; "
                    f"not {', '.join(sorted(map(str, unknown)))}"
                )
            custom = custom.merged(Customization.build(**customize, where=where))
        elif customize is not None:
            raise KvmConfigError(
                f"{where}: customize= takes a Customization or a dict of files=, hostname=, run="
            )
        network, vlan = _vlans_given_as_network(network, vlan, where)
        shaped = settings.with_marker(
            {
                k: v
                for k, v in (("memory", memory), ("cpus", cpus), ("network", network))
                if v is not None
            },
            where,
        )
        if disk is not None:
            base = _kvm_session.disk_image(Path(disk).resolve())
        elif isinstance(image, Image):
            base = image
        elif image is not None:
            check_spec(str(image))
            base = _kvm_session.image(str(image))
        else:
            base = kvm_image
        if custom:
            try:
                base = _kvm_session.customized(base, custom)
            except KvmUnavailable as exc:
                pytest.skip(f"pytest-kvm: {exc}")
            hostname = hostname or custom.hostname
        vlans = (vlan,) if isinstance(vlan, Vlan) else tuple(vlan or ())
        for segment in vlans:
            if not isinstance(segment, Vlan):
                raise KvmConfigError(f"{where}: vlan={segment!r} is not a kvm_vlan segment")
        config = GuestConfig(
            image=base,
            memory=shaped.memory,
            cpus=shaped.cpus,
            network=shaped.network,
            boot_timeout=shaped.boot_timeout,
            hostname=hostname,
            cdrom=Path(cdrom) if cdrom is not None else None,
            disk_size=disk_size,
            boot=boot,
            ssh=ssh,
            kernel_args=shaped.kernel_args,
            vlans=vlans,
            backend=shaped.backend,
            keepable=shaped.keep_on_failure,
            blank=blank,
            kernel=kernel_path,
            initrd=initrd_path,
            append=append,
            display=display or blank,
            vnc=shaped.vnc,
            installed=disk is not None,
        )
        try:
            run = _kvm_session.run
        except KvmUnavailable as exc:
            pytest.skip(f"pytest-kvm: {exc}")
        labels = (
            ("run", run.identity.run_id), ("worker", run.identity.worker),
            ("pid", str(os.getpid())), ("host", socket.gethostname()),
            ("test", request.node.nodeid),
        )  # fmt: skip
        config = dataclasses.replace(config, runner=_kvm_session.backend, labels=labels)
        if shaped.kernel_args:
            # A real boot of the image's own kernel with the extra arguments.
            files = _kvm_session.boot_files(base)
            config = dataclasses.replace(config, boot_files=files)
        template = None
        # Restore from a template unless the guest must boot for real. A bridge
        # guest boots: it needs its own MAC and DHCP lease from its first breath.
        if (
            shaped.snapshot and cdrom is None and boot == "disk" and ssh
            and disk_size is None and not shaped.kernel_args and disk is None
            and kernel is None and not display
            and shaped.network.kind == "user" and not base.is_encrypted
            and not backend_class(shaped.backend).refusal("templates")
        ):  # fmt: skip
            shape = Shape(
                memory=shaped.memory,
                cpus=shaped.cpus,
                network=shaped.network.kind,
                vlans=len(vlans),
                display=shaped.vnc,
            )
            template = _kvm_session.templates.get(base, shape, shaped.boot_timeout)
        guest = Guest(run, config, name, template=template)
        guest.boot_disk = factory
        started.append(guest)
        guest.start()
        return guest

    with ExitStack() as stack:
        stack.callback(_close_all, started)
        yield factory


def _vlans_given_as_network(
    network: str | Vlan | None, vlan: Vlan | Sequence[Vlan] | None, where: str
) -> tuple[str | None, Vlan | Sequence[Vlan] | None]:
    """``network=kvm_vlan`` (what users try first) means ``vlan=kvm_vlan``: one more
    NIC on the segment; the primary network, which carries SSH, stays as configured."""
    if not isinstance(network, Vlan):
        return network, vlan
    if vlan is not None:
        raise KvmConfigError(
            f"{where}: network= got a kvm_vlan segment and vlan= is given too: "
            "pass every kvm_vlan segment as vlan="
        )
    return None, network


def _close_all(guests: list[Guest]) -> None:
    """Close every guest, newest first; an error closing one does not skip the others."""
    errors: list[BaseException] = []
    for guest in reversed(guests):
        try:
            guest.close()
        except BaseException as exc:
            errors.append(exc)
    if errors:
        raise errors[0]


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
def kvm_vlan(_kvm_session: _Session) -> Iterator[Vlan]:
    """A private layer-2 segment for this test's guests: ``kvm_guest_factory(vlan=...)``.

    Rootless (QEMU dgram sockets and a switch in this process); every guest on it gets
    a static address, ``kvm_vlan.address_of(guest)``, in 192.168.76.0/24."""
    try:
        run = _kvm_session.run
    except KvmUnavailable as exc:
        pytest.skip(f"pytest-kvm: {exc}")
    number = next(_vlan_numbers)
    vlan = Vlan(f"vlan{number}", run.sock_dir / f"vlan{number}")
    with vlan:
        yield vlan


@pytest.fixture
def kvm_guest(kvm_guest_factory: GuestFactory) -> Guest:
    """A started guest, SSH-ready, destroyed after the test."""
    return kvm_guest_factory()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    if call.when == "teardown":  # before the report is made: --junitxml reads its properties
        started: list[Guest] = item.stash.get(guests_key, [])
        item.user_properties.extend(matrix.junit_properties(item, started))
    report = yield
    guests = item.stash.get(guests_key, [])
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
    if report.failed and call.when in ("call", "setup"):
        settings = item.config.stash.get(settings_key, None)
        extras: list[Any] = []
        for guest in guests:
            if guest.workdir is None or not guest.serial_log.exists():
                continue
            console = tail(guest.serial_log, artifacts.CONSOLE_TAIL_LINES)
            report.sections.append((f"kvm console tail: {guest.name}", console))
            if settings is not None:
                saved = _save_artifacts(
                    guest, settings.artifacts, item.nodeid, settings.keep_on_failure
                )
                report.sections.append((f"kvm artifacts: {guest.name}", str(saved)))
                extras += artifacts.html_extras(item.config, guest.name, saved, console)
        if extras:  # pytest-html shows them (its report.extras)
            report.extras = [*getattr(report, "extras", []), *extras]
    return report


def _save_artifacts(guest: Guest, root: Path, nodeid: str, keep: bool = False) -> Path:
    return artifacts.save(guest, root, nodeid, keep_running=keep)


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
                _marker_settings(item, settings)
        except KvmError as exc:
            raise pytest.UsageError(f"pytest-kvm: {exc}") from None
