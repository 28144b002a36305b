"""Prepared snapshots (``kvm_snapshot``): a guest prepared once by a test suite's own
``setup(guest)`` and saved as a template chained on the base template, that tests are
restored from like any template.

A ``Snapshot`` is a recipe, made per base lazily: when a guest asks for it, the
session resolves the base (the image it pins, else the test's image; for a snapshot
of a snapshot, that one's template), gets or builds the base template for the
guest's shape, then gets or builds this one, keyed by the base template's key, the
name, the source of ``setup`` and the contents of the ``inputs`` files.

A build restores a clone of the base template (the ordinary ``Restore``) whose disk
overlay and whose RAM (a private copy of the base's RAM file, mapped shared, as a
template's boot maps its own) go into the building directory; ``setup`` runs; then
the same settle and save as a template's build. Its ``disk.qcow2`` stays an overlay
backed by the base template's disk (an absolute path). The directory is renamed into
place under the template's file lock (``TemplateStore.obtain``): one builder under
xdist, the others wait. ``meta.json`` records ``base`` and ``base_created`` so that
``template prune`` can tell a snapshot whose base is gone or was made again.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import marshal
import os
import re
import shutil
import textwrap
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .config import NetworkSpec
from .errors import CommandFailed, GuestError, ImageError, KvmConfigError, SnapshotFailed
from .guest import BootPlan, Guest, GuestConfig
from .images import Image
from .images.builder import fsync_path
from .images.overlay import MIN_FREE_SPACE, check_free_space
from .template import (
    SETTLE,
    TEMPLATE_HOSTNAME,
    WARM,
    Shape,
    Template,
    TemplateStore,
    saved_facts,
)
from .util import sha256_file, tail, tail_text

# Bump when what goes into a snapshot changes, so old ones are not used.
SNAPSHOT_FORMAT = 1
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$")
SHAPE_KEYS = ("memory", "cpus")
CONSOLE_LINES = 25
OUTPUT_LINES = 20

Setup = Callable[[Guest], object]


@dataclass(frozen=True, eq=False)
class Snapshot:
    """A prepared state: ``setup`` run once over a base, saved, cloned by tests. Made by
    ``kvm_snapshot(...)`` (or ``pytest_kvm.snapshot.define`` at module level, for
    ``@pytest.mark.kvm(image=...)``)."""

    name: str
    setup: Setup = field(repr=False)
    image: str | Image | Snapshot | None = None
    inputs: tuple[tuple[str, Path], ...] = ()  # (as given, absolute)
    memory: int | None = None
    cpus: int | None = None
    source: str = field(default="", repr=False)  # setup's source, or what stands for it

    def chain(self) -> list[Snapshot]:
        """The snapshots from the one over an image to this one."""
        chain: list[Snapshot] = [self]
        while isinstance(chain[0].image, Snapshot):
            if len(chain) > 16 or chain[0].image in chain:
                raise KvmConfigError(f"kvm_snapshot {self.name!r}: its image= chain loops")
            chain.insert(0, chain[0].image)
        return chain

    @property
    def base_image(self) -> str | Image | None:
        """The image its chain starts from (None: the test's image)."""
        image = self.chain()[0].image
        assert not isinstance(image, Snapshot)
        return image

    def shape(self) -> dict[str, int]:
        """memory=/cpus= given along the chain, the outer snapshot's winning."""
        shape: dict[str, int] = {}
        for snap in self.chain():
            shape.update({k: v for k in SHAPE_KEYS if (v := getattr(snap, k)) is not None})
        return shape


def define(
    name: str,
    setup: Setup,
    *,
    image: str | os.PathLike[str] | Image | Snapshot | None = None,
    inputs: Iterable[str | os.PathLike[str]] = (),
    **shape: int,
) -> Snapshot:
    """``kvm_snapshot(name, setup, *, image=None, inputs=(), memory=, cpus=)``."""
    where = f"kvm_snapshot({name!r})"
    if not isinstance(name, str) or not NAME.match(name):
        raise KvmConfigError(
            f"{where}: the name must be 1-40 letters, digits, '_', '.', '-' (first a letter "
            "or digit)"
        )
    if not callable(setup):
        raise KvmConfigError(f"{where}: setup must be a function taking the guest")
    unknown = set(shape) - set(SHAPE_KEYS)
    if unknown:
        raise KvmConfigError(
            f"{where}: takes {', '.join(SHAPE_KEYS)} as shape; not {', '.join(sorted(unknown))}"
        )
    for key, value in shape.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise KvmConfigError(f"{where}: {key}={value!r} is not a positive integer")
    if isinstance(inputs, str | os.PathLike):
        inputs = [inputs]
    files = []
    for given in inputs:
        path = Path(given).expanduser().absolute()
        if not path.is_file():
            raise KvmConfigError(f"{where}: input {str(given)!r} is not a file")
        files.append((str(given), path))
    if isinstance(image, os.PathLike):
        image = os.fspath(image)
    return Snapshot(
        name=name, setup=setup, image=image, inputs=tuple(files),
        memory=shape.get("memory"), cpus=shape.get("cpus"), source=setup_source(setup, where),
    )  # fmt: skip


def setup_source(setup: Setup, where: str) -> str:
    """What stands for ``setup`` in the key: its source text; where Python has none
    (defined in a REPL, ``exec``), its compiled code, with a warning."""
    try:
        return textwrap.dedent(inspect.getsource(setup))
    except (OSError, TypeError):
        pass
    code = getattr(setup, "__code__", None)
    if code is None:
        raise KvmConfigError(
            f"{where}: setup has no source and no code to key the snapshot by: pass a "
            "function defined in a file"
        ) from None
    warnings.warn(
        f"{where}: the source of setup is not available; the snapshot is keyed by its "
        "compiled code instead (rebuilt on any change to it, and on another Python)",
        stacklevel=3,
    )
    return "code:" + hashlib.sha256(marshal.dumps(code)).hexdigest()


def snapshot_key(snap: Snapshot, base: Template, inputs: dict[str, str]) -> str:
    """The base template's key and when it was made (one made again under the same
    key is another disk under the snapshot's overlay), the name, setup's source and
    the inputs' contents."""
    payload = json.dumps(
        {
            "format": SNAPSHOT_FORMAT,
            "base": base.key,
            "base_created": base_created(base),
            "name": snap.name,
            "setup": hashlib.sha256(snap.source.encode()).hexdigest(),
            "inputs": inputs,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def base_created(base: Template) -> object:
    """When ``base`` was made (its meta.json's ``created``)."""
    try:
        return json.loads((base.dir / "meta.json").read_text()).get("created")
    except (OSError, ValueError, AttributeError):
        return None


def snapshot_name(snap: Snapshot, base: Template, key: str) -> str:
    """``<base without its key>@<name>-<key>``: ``debian-12-1024M-2cpu-user@web-…``."""
    return f"{base.name.rsplit('-', 1)[0]}@{snap.name}-{key}"


class Snapshots:
    """The run's prepared snapshots, over its template store. A snapshot whose setup
    failed fails again at once for later tests of this process (one failing setup is
    not run per test); another process (an xdist worker) tries it once itself."""

    def __init__(self, store: TemplateStore) -> None:
        self.store = store
        self.builds = 0  # made by this process (tests read it)
        self._failed: dict[str, SnapshotFailed] = {}
        self._digests: dict[Path, str] = {}
        self._lock = threading.Lock()

    def resolve(self, snap: Snapshot, image: Image, shape: Shape, timeout: float) -> Template:
        """The template of ``snap`` over ``image`` at ``shape``: each of its chain
        checked, or built now."""
        with self._lock:
            template = self.store.get(image, shape, timeout)
            for step in snap.chain():
                template = self._get(step, template, timeout)
            return template

    def _get(self, snap: Snapshot, base: Template, timeout: float) -> Template:
        inputs = {given: self._digest(path) for given, path in snap.inputs}
        key = snapshot_key(snap, base, inputs)
        if key in self._failed:
            raise self._failed[key]
        name = snapshot_name(snap, base, key)
        path = self.store.root / name
        try:
            return self.store.obtain(
                name,
                key,
                lambda: self.store._load(path, key, base.image, base.shape),
                lambda: self._build(snap, base, name, key, timeout),
            )
        except SnapshotFailed as exc:
            self._failed[key] = exc
            raise

    def _digest(self, path: Path) -> str:
        if path not in self._digests:
            try:
                self._digests[path] = sha256_file(path)
            except OSError as exc:
                raise KvmConfigError(f"kvm_snapshot input {path}: {exc}") from None
        return self._digests[path]

    def _build(
        self, snap: Snapshot, base: Template, name: str, key: str, timeout: float
    ) -> Template:
        root, progress = self.store.root, self.store.progress
        for stale in root.glob(f".{name}.building-*"):  # we hold the lock: a dead run's
            shutil.rmtree(stale, ignore_errors=True)
        check_free_space(root, (base.shape.memory << 20) + MIN_FREE_SPACE, f"snapshot {name}")
        work = root / f".{name}.building-{os.getpid()}"
        work.mkdir(mode=0o700)
        started = time.monotonic()
        progress(
            f"pytest-kvm: making snapshot {snap.name} ({name}): running its setup in a "
            f"clone of template {base.name}"
        )
        try:
            mac, agent, vlan_macs, facts = self._prepare(snap, base, work, timeout)
            extra: dict[str, object] = {
                **facts,
                "snapshot": snap.name, "snapshot_format": SNAPSHOT_FORMAT,
                "base": base.name, "base_key": base.key,
                "base_created": base_created(base),
                "inputs": {given: str(path) for given, path in snap.inputs},
            }  # fmt: skip
            self.store._write_meta(
                work, key, base.image, base.shape, mac, agent, vlan_macs, extra=extra
            )
            fsync_path(work)
            os.rename(work, root / name)
            fsync_path(root)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        self.builds += 1
        progress(f"pytest-kvm: snapshot {snap.name} ready in {time.monotonic() - started:.0f} s")
        template = self.store._load(root / name, key, base.image, base.shape)
        if template is None:
            raise SnapshotFailed(f"snapshot {name} failed its own check right after it was made")
        return template

    def _prepare(
        self, snap: Snapshot, base: Template, work: Path, timeout: float
    ) -> tuple[str, bool, tuple[str, ...], dict[str, object]]:
        """Restore a clone of ``base`` into ``work``, run the setup, settle, save: the
        saved guest's MAC, whether its agent answers, its vlan NICs' MACs, and
        ``saved_facts``."""
        shape = base.shape
        config = GuestConfig(
            image=base.image, memory=shape.memory, cpus=shape.cpus,
            network=NetworkSpec(shape.network), boot_timeout=timeout,
            hostname=TEMPLATE_HOSTNAME, vlans=(None,) * shape.vlans, vnc=shape.display,
            tpm=shape.tpm, snapshot=True, firmware=shape.firmware, arch=shape.arch,
        )  # fmt: skip
        plan = BootPlan(work, base.client_key, base.host_key)
        where = f"kvm_snapshot {snap.name!r}"
        try:
            guest = Guest(self.store.run, config, f"snapshot-{snap.name}"[:40], template=base,
                          plan=plan)  # fmt: skip
            with guest:
                run_setup(snap, guest, base)
                guest.run(SETTLE, timeout=timeout)
                guest.reconnect()  # the path every clone takes first, warm in the page cache
                guest.run(WARM, timeout=timeout)
                agent = guest.agent_answers()
                facts = saved_facts(guest, timeout)
                host_key = guest.host_key
                assert host_key is not None
                guest.save_state(work / "state")
                shutil.copyfile(guest.serial_log, work / "serial.log")
                saved = (guest.mac, agent, guest.vlan_macs, facts)
        except (GuestError, ImageError) as exc:
            if isinstance(exc, SnapshotFailed):
                raise
            raise SnapshotFailed(f"{where}: making it: {exc}", snapshot=snap.name) from exc
        shutil.copyfile(base.seed, work / "seed.iso")  # clones need the same devices
        base.client_key.save(work / "id_ed25519")
        host_key.save(work / "host_ed25519")
        return saved


def run_setup(snap: Snapshot, guest: Guest, base: Template) -> None:
    """``snap.setup(guest)``; an exception from it becomes ``SnapshotFailed`` with the
    console tail (a failed command's message already has both output tails)."""
    __tracebackhide__ = True
    try:
        snap.setup(guest)
    except Exception as exc:
        console = tail(guest.serial_log, CONSOLE_LINES)
        output = ""
        if isinstance(exc, CommandFailed):
            output = (
                f"\nits stdout:\n{tail_text(exc.stdout, OUTPUT_LINES)}"
                f"\nits stderr:\n{tail_text(exc.stderr, OUTPUT_LINES)}"
            )
        raise SnapshotFailed(
            f"kvm_snapshot {snap.name!r}: setup failed in {guest.describe()} (a clone of "
            f"template {base.name}); nothing was saved: {type(exc).__name__}: {exc}"
            f"{output}\nlast console lines:\n{console}",
            guest.name,
            snapshot=snap.name,
            console_tail=console,
        ) from exc
