"""From a request to a running guest: the per-process state (accelerator choice, run
directory and key, resolved images, templates, boot files) and, per test, the guests
it started. A request becomes a ``GuestConfig`` here: marker merge, image, customisation
layers, backend target, boot files and the choice of a template."""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from . import accel
from .arch import host_arch
from .backends import backend_class, load_backend
from .backends.base import Backend
from .backends.qemu import QEMU_BINARY
from .config import DEFAULT_BRIDGE_HELPER, Settings
from .customize import Customization, customized_image, guestfs_available, probe_cloud_init
from .errors import KvmConfigError, KvmUnavailable
from .guest import Guest, GuestConfig, template_refusal
from .guestlog import HandOver
from .images import Image
from .images.kernel import BootFiles, boot_files
from .images.store import classify
from .images.store import resolve as resolve_image
from .network import NetworkSpec, bridge_problem, has_net_admin, helper_problem
from .reaper import reap
from .request import (
    GuestRequest,
    SpecChecks,
    check_factory_call,
    guest_arch,
    guest_firmware,
)
from .run import RunContext
from .snapshot import Snapshot, Snapshots
from .template import Shape, Template, TemplateStore
from .tpm import check_swtpm

settings_key = pytest.StashKey[Settings]()
guests_key = pytest.StashKey[list[Guest]]()
# Guest name -> when it was handed to the test: where the error gate starts reading.
handovers_key = pytest.StashKey[dict[str, HandOver]]()
spec_checks_key = pytest.StashKey[SpecChecks]()


class KvmSession:
    """Lazily made per-process state: accelerator choice, run dir and key, resolved images."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.settings = config.stash[settings_key]
        self.specs = config.stash.setdefault(spec_checks_key, SpecChecks())
        self._run: RunContext | None = None
        self._images: dict[str, Image] = {}
        self._templates: TemplateStore | None = None
        self._snapshots: Snapshots | None = None
        self._boot_files: dict[Path, BootFiles] = {}
        self._lock = threading.RLock()
        self._backends: dict[tuple[str, str, str], Backend] = {}

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

    @property
    def snapshots(self) -> Snapshots:
        """The run's prepared snapshots (``kvm_snapshot``), over its templates."""
        with self._lock:
            if self._snapshots is None:
                self._snapshots = Snapshots(self._template_store())
            return self._snapshots

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
        # Without libguestfs an image is assumed to run cloud-init; with it, an image
        # given by path is looked at (once: the answer is kept) as it is resolved.
        probe = None
        if classify(spec) == "path" and guestfs_available():
            probe = self._probe_cloud_init
        return resolve_image(
            spec, self.settings.cache, self.progress, secret, offline=self.settings.offline,
            probe_cloud_init=probe,
        )  # fmt: skip

    def _probe_cloud_init(self, image: Image) -> bool:
        return probe_cloud_init(image, self.settings.cache, self.force_tcg)

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
            for backend in self._backends.values():
                backend.close()

    def backend(self, settings: Settings) -> Backend:
        """The run's backend for these settings (a marker may name another URI or
        pool), made once per backend, URI and pool."""
        key = (settings.backend, settings.uri, settings.pool)
        with self._lock:
            if key not in self._backends:
                self._backends[key] = load_backend(settings.backend, settings)
            return self._backends[key]


def _shape(config: GuestConfig) -> Shape:
    net = config.network
    return Shape(
        memory=config.memory,
        cpus=config.cpus,
        # A bridge's: one template per bridge (its clones join the same one).
        network=net.kind if net.kind == "user" else f"{net.kind}={net.name}",
        vlans=len(config.vlans),
        display=config.vnc,
        tpm=config.tpm,
        firmware=config.firmware,
        arch=config.arch,
    )


def _bridge_unusable(net: NetworkSpec) -> bool:
    """Whether no guest can join this bridge here (no such bridge, no tap and no helper)."""
    if bridge_problem(net.name):
        return True
    if net.helper:
        return bool(helper_problem(net.helper, net.name))
    return not has_net_admin() and bool(helper_problem(DEFAULT_BRIDGE_HELPER, net.name))


class TestGuests:
    """One test's guests: ``start(...)`` is what ``kvm_guest_factory`` hands the test
    (and what a guest's ``boot_installed()`` calls); ``close()`` ends them all."""

    __test__ = False  # not a test class, whatever its name

    def __init__(
        self,
        session: KvmSession,
        settings: Settings,
        image: Image,
        nodeid: str,
        snapshot: Snapshot | None = None,
    ) -> None:
        self.session = session
        self.settings = settings  # the run's, with the test's markers applied
        self.image = image  # the test's kvm_image: what image=None means
        self.nodeid = nodeid
        self.snapshot = snapshot  # @pytest.mark.kvm(image=a Snapshot): image=None means it
        self.started: list[Guest] = []
        self.handed_over: dict[str, HandOver] = {}

    def start(self, *args: Any, **kwargs: Any) -> Guest:
        """``factory(image=None, network=None, memory=None, cpus=None, name=None, ...)``:
        the arguments of ``GuestRequest.build``."""
        __tracebackhide__ = True
        check_factory_call(args, kwargs)
        request = GuestRequest.build(f"{self.nodeid}: kvm_guest_factory", *args, **kwargs)
        snapshot = request.image if isinstance(request.image, Snapshot) else None
        if request.image is None and request.disk is None:
            snapshot = self.snapshot
        if snapshot is not None:  # its base image, its memory=/cpus= unless given here
            shape = snapshot.shape()
            request = dataclasses.replace(
                request,
                image=snapshot.base_image,
                memory=request.memory if request.memory is not None else shape.get("memory"),
                cpus=request.cpus if request.cpus is not None else shape.get("cpus"),
            )
        config = self.guest_config(request)
        if snapshot is not None:
            template: Template | None = self.snapshot_for(config, snapshot)
        else:
            template = self.template_for(config)
        guest = Guest(self.session.run, config, request.name, template=template)
        guest.boot_disk = self.start  # boot_installed(): this test's next guest
        self.started.append(guest)
        guest.start()
        self.handed_over[guest.name] = HandOver.now(guest, self.settings.fail_on)
        return guest

    def guest_config(self, request: GuestRequest) -> GuestConfig:
        """The marker's and the call's settings, the image with its customisation
        layer, the backend's target and the boot files: how the guest is made."""
        shaped = request.shaped(self.settings)
        if shaped.tpm and not backend_class(shaped.backend).runs_swtpm:
            check_swtpm(self.nodeid)  # the Debian package named, before anything starts
        base = self._base_image(request)
        hostname = request.hostname
        custom = request.customization(self.settings)
        try:
            arch = guest_arch(shaped, base)
        except KvmUnavailable as exc:  # its QEMU is not installed
            pytest.skip(f"pytest-kvm: {exc}")
        self._check_arch(arch, base, shaped, custom)
        if custom:
            try:
                base = self.session.customized(base, custom)
            except KvmUnavailable as exc:
                pytest.skip(f"pytest-kvm: {exc}")
            hostname = hostname or custom.hostname
        config = GuestConfig(
            image=base, memory=shaped.memory, cpus=shaped.cpus, network=shaped.network,
            boot_timeout=shaped.boot_timeout, hostname=hostname, cdrom=request.cdrom,
            disk_size=request.disk_size, boot=request.boot, ssh=request.ssh,
            kernel_args=shaped.kernel_args, vlans=request.vlans, backend=shaped.backend,
            keepable=shaped.keep_on_failure, blank=request.blank, kernel=request.kernel,
            initrd=request.initrd, append=request.append,
            display=request.display or request.blank, vnc=shaped.vnc,
            installed=request.disk is not None, snapshot=shaped.snapshot, tpm=shaped.tpm,
            shares=request.shares(shaped),
            firmware=guest_firmware(shaped, base, arch), arch=arch,
        )  # fmt: skip
        try:
            run = self.session.run
        except KvmUnavailable as exc:
            pytest.skip(f"pytest-kvm: {exc}")
        labels = (
            ("run", run.identity.run_id), ("worker", run.identity.worker),
            ("pid", str(os.getpid())), ("host", socket.gethostname()),
            ("test", self.nodeid),
        )  # fmt: skip
        config = dataclasses.replace(config, runner=self.session.backend(shaped), labels=labels)
        if shaped.kernel_args:
            # A real boot of the image's own kernel with the extra arguments.
            config = dataclasses.replace(config, boot_files=self.session.boot_files(base))
        return config

    def _check_arch(self, arch: str, image: Image, shaped: Settings, custom: Customization) -> None:
        """What a guest of another architecture than x86_64 cannot have: one line each."""
        if arch == "x86_64":
            return
        where = f"{self.nodeid}: image {image.name!r} is {arch}"
        refused = backend_class(shaped.backend).refusal("architectures")
        if refused:
            raise KvmConfigError(f"{where}: {refused}")
        if shaped.tpm:
            raise KvmConfigError(f"{where}: tpm=True: a TPM is emulated for x86_64 guests only")
        if custom.run and arch != host_arch():
            # libguestfs' appliance runs the host's kernel: the image's own programs
            # (run= goes through its /bin/sh) cannot run there.
            raise KvmConfigError(
                f"{where}: customize run= runs the image's programs in libguestfs' "
                f"{host_arch()} appliance, which cannot run {arch} code (files= and "
                "hostname= work; run the command in the guest with guest.succeed)"
            )

    def _base_image(self, request: GuestRequest) -> Image:
        if request.disk is not None:
            return self.session.disk_image(request.disk.resolve())
        if isinstance(request.image, Image):
            return request.image
        assert not isinstance(request.image, Snapshot)  # start() resolved it
        if request.image is not None:
            self.session.specs.check(str(request.image))
            return self.session.image(str(request.image))
        return self.image

    def template_for(self, config: GuestConfig) -> Template | None:
        """The template this guest is restored from, or None: it boots for real."""
        if not config.snapshot or config.restore_refusal():
            return None
        net = config.network
        if net.kind == "bridge" and _bridge_unusable(net):
            return None  # the guest's own start says what is wrong, no template is made
        template = self.session.templates.get(
            config.image, _shape(config), config.boot_timeout, config.runner, config.labels
        )
        return None if template_refusal(config, template) else template

    def snapshot_for(self, config: GuestConfig, snapshot: Snapshot) -> Template:
        """The prepared snapshot's template (built now if need be) that this guest is
        restored from: whatever --kvm-snapshot says, since it exists only as one."""
        refusal = config.restore_refusal() or backend_class(config.backend).refusal("snapshots")
        if not refusal and config.network.kind != "user":
            refusal = f"network {config.network}: snapshots are made on user networking only"
        if refusal:
            raise KvmConfigError(
                f"{self.nodeid}: image=kvm_snapshot {snapshot.name!r}: its guests are "
                f"restored from it, and this one cannot be: {refusal}"
            )
        return self.session.snapshots.resolve(
            snapshot, config.image, _shape(config), config.boot_timeout
        )

    def close(self) -> None:
        """Close every guest, newest first; an error closing one does not skip the others."""
        errors: list[BaseException] = []
        for guest in reversed(self.started):
            try:
                guest.close()
            except BaseException as exc:
                errors.append(exc)
        if errors:
            raise errors[0]
