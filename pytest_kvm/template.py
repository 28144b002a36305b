"""Templates: boot an (image, shape) once, save it, restore every test's guest from it.

A template is a directory in the cache (``templates/<image>-<shape>-<key>/``):

- ``disk.qcow2``  the guest's disk when it was saved (an overlay on the base image), frozen
- ``ram``         guest RAM, written through a shared file mapping while the template ran
- ``state``       the device state (a QEMU migration stream without the RAM pages)
- ``seed.iso``    the NoCloud seed it booted with (clones need the same devices)
- ``serial.log``  its console from power-on, which starts every clone's log
- ``id_ed25519`` and ``host_ed25519``  the keys its sshd trusts and offers
- ``meta.json``   written last: the key, the MAC, and each file's size and mtime

It is built in a ``.<name>.building-<pid>`` directory and renamed into place only when
complete, under a file lock, so a run killed while building leaves nothing that a later
run would use, and parallel workers build it once. Every process checks a template
(key, sizes, mtimes, state checksum, ``qemu-img check``) before its first clone; one
that fails is removed and rebuilt.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from . import arch as arches
from .backends.base import Backend, Labels
from .backends.qemu import QEMU_BINARY
from .config import parse_network
from .errors import GuestError, ImageError, KvmError
from .firmware import VARS_NAME
from .guest import BootPlan, Guest, GuestConfig
from .guest.identity import HOLDS_HOST_KEYS
from .images import Image
from .images.builder import fsync_path
from .images.overlay import MIN_FREE_SPACE, check_free_space
from .run import RunContext
from .ssh import KeyPair
from .uselock import hold, release, unused

# Bump when what goes into a template changes, so old ones are not used.
TEMPLATE_FORMAT = 6  # 6: what systemd gave up on in a slow boot is started before the save
TEMPLATE_HOSTNAME = "pytest-kvm-template"
# What a template waits for before it is saved: boot finished, cloud-init done,
# and as little page cache as possible in the RAM that clones map.
SETTLE = (
    "cloud-init status --wait >/dev/null 2>&1; "
    "systemctl is-system-running --wait >/dev/null 2>&1; "
    "sync; echo 3 > /proc/sys/vm/drop_caches; sync"
)
WARM = "true"
# A slow host (TCG under load) can make systemd give up during the template's one boot:
# a device that showed up after its 90 s timeout (/dev/ttyS0: no serial getty, no login
# prompt on the console), and the units that depend on it. Clones inherit whatever the
# template saved, for as long as it is cached, so this is repaired before the save.
BOOT_GAVE_UP = re.compile(r"Timed out waiting for device|Dependency failed for")
PID1_LOG = "journalctl -b _PID=1 -o json --output-fields=UNIT,MESSAGE --no-pager 2>/dev/null"
_CHECKED_FILES = ("disk.qcow2", "ram", "state", "seed.iso", "id_ed25519", "host_ed25519")


@dataclass(frozen=True)
class Shape:
    """What makes two guests of one image need different templates."""

    memory: int
    cpus: int
    network: str = "user"
    kernel_args: str = ""
    vlans: int = 0  # NICs for kvm_vlan segments, beyond the primary one
    display: bool = False  # a graphics card (--kvm-vnc): clones must have it too
    tpm: bool = False  # a TPM 2.0 (swtpm): its state is in the saved state
    firmware: str = "bios"  # "uefi", "uefi-secure": OVMF, clones copy its variables
    arch: str = "x86_64"  # the guest's architecture (arch.py): another QEMU and machine

    def label(self) -> str:
        nics = f"-{self.vlans}vlan" if self.vlans else ""
        vga = "-vga" if self.display else ""
        tpm = "-tpm" if self.tpm else ""
        network = self.network.replace("=", "-")  # bridge=br0: bridge-br0
        firmware = f"-{self.firmware}" if self.firmware != "bios" else ""
        arch = f"-{self.arch}" if self.arch != "x86_64" else ""
        return f"{self.memory}M-{self.cpus}cpu-{network}{nics}{vga}{tpm}{firmware}{arch}"

    def key_fields(self) -> dict[str, object]:
        """What goes into the template key: fields at their defaults are left out, so
        templates made before a field existed keep their keys."""
        fields = asdict(self)
        if not self.display:
            del fields["display"]
        if not self.tpm:
            del fields["tpm"]
        if self.firmware == "bios":
            del fields["firmware"]
        if self.arch == "x86_64":
            del fields["arch"]
        return fields


@dataclass(frozen=True)
class Template:
    """A saved, SSH-ready guest that clones are restored from."""

    dir: Path
    key: str
    image: Image
    shape: Shape
    mac: str
    client_key: KeyPair
    host_key: KeyPair
    agent: bool = False  # qemu-ga answered in the template, so it will in clones
    # Its sshd reads host keys once (identity.HOLDS_HOST_KEYS); None: not recorded
    # (a template made before this was), clones ask the guest.
    sshd_holds_keys: bool | None = None
    vlan_macs: tuple[str, ...] = ()  # its vlan NICs' MACs, which clones change

    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def disk(self) -> Path:
        return self.dir / "disk.qcow2"

    @property
    def ram(self) -> Path:
        return self.dir / "ram"

    @property
    def state(self) -> Path:
        return self.dir / "state"

    @property
    def seed(self) -> Path:
        return self.dir / "seed.iso"

    @property
    def serial_log(self) -> Path:
        return self.dir / "serial.log"


@functools.cache
def qemu_version(binary: str = QEMU_BINARY) -> str:
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise KvmError(f"{binary} --version failed: {exc}") from None
    return out.splitlines()[0].strip() if out else "unknown"


def image_identity(image: Image) -> dict[str, object]:
    return image.identity()


def template_key(
    image: Image, shape: Shape, accel: str, qemu: str, backend: dict[str, object] | None = None
) -> str:
    fields = {
        "format": TEMPLATE_FORMAT,
        "image": image_identity(image),
        "shape": shape.key_fields(),
        "accel": accel,
        "qemu": qemu,
    }
    if backend:  # the qemu backend's {} leaves its keys as they were
        fields["backend"] = backend
    payload = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_record(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


class TemplateStore:
    """Finds, checks and builds templates under ``root`` (``<cache>/templates``)."""

    def __init__(
        self,
        root: Path,
        run: RunContext,
        progress: Callable[[str], None] = lambda message: None,
        lock_timeout: float = 3600.0,
    ) -> None:
        self.root = root
        self.run = run
        self.progress = progress
        self.lock_timeout = lock_timeout
        self._checked: dict[str, Template] = {}
        self._in_use: set[str] = set()
        # Threads of this process that want the same template wait for each other
        # here, quietly, before one of them takes the file lock other processes share.
        self._names_lock = threading.Lock()
        self._name_locks: dict[str, threading.Lock] = {}

    def get(
        self,
        image: Image,
        shape: Shape,
        boot_timeout: float,
        runner: Backend | None = None,
        labels: Labels = (),
    ) -> Template:
        """The template for ``image`` at ``shape``: checked, or built now. ``runner``
        is the backend its clones run on (None: the qemu backend); ``labels`` name
        the owner of the guest that makes it."""
        identity = runner.template_identity() if runner is not None else {}
        accel = self.run.accel.name if arches.get(shape.arch).is_host() else "tcg"
        qemu = qemu_version(arches.get(shape.arch).qemu)
        key = template_key(image, shape, accel, qemu, identity)
        backend = f"{runner.name}-" if identity and runner is not None else ""
        name = f"{image.name}-{backend}{shape.label()}-{key}"
        return self.obtain(
            name,
            key,
            lambda: self._load(self.root / name, key, image, shape),
            lambda: self._build(name, key, image, shape, boot_timeout, runner, labels),
        )

    def obtain(
        self,
        name: str,
        key: str,
        load: Callable[[], Template | None],
        build: Callable[[], Template],
    ) -> Template:
        """Template ``name``: ``load()`` (checked) or else ``build()``, under its file
        lock (one builder; the others wait), then held in use until the run ends.
        Prepared snapshots (``snapshot.py``) come through here too."""
        if key in self._checked:
            return self._checked[key]
        with self._names_lock:
            mine = self._name_locks.setdefault(name, threading.Lock())
        with mine:
            if key not in self._checked:
                self._checked[key] = self._obtain(name, load, build)
        return self._checked[key]

    def _obtain(
        self, name: str, load: Callable[[], Template | None], build: Callable[[], Template]
    ) -> Template:
        self.root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.root / f".{name}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            self.progress(f"pytest-kvm: waiting for another process to make template {name}")
            try:
                lock.acquire(timeout=self.lock_timeout)
            except Timeout:
                raise KvmError(
                    f"template {name}: another process held its lock for {self.lock_timeout:.0f} s"
                ) from None
        try:
            template = load()
            if template is None:
                template = build()
            # In use from now until the run ends: prune leaves it alone. Taken under
            # the build lock, which prune holds while it removes a template.
            hold(use_lock(self.root, name))
            self._in_use.add(name)
        finally:
            lock.release()
        return template

    def close(self) -> None:
        """The run is over: its templates are no longer in use by this process."""
        for name in sorted(self._in_use):
            release(use_lock(self.root, name))
        self._in_use.clear()

    # -- checking ----------------------------------------------------------------------

    def _load(self, path: Path, key: str, image: Image, shape: Shape) -> Template | None:
        if not path.exists():
            return None
        problem = self._problem(path, key)
        if problem:
            self.progress(f"pytest-kvm: template {path.name} {problem}; making it again")
            shutil.rmtree(path, ignore_errors=True)
            return None
        meta = json.loads((path / "meta.json").read_text())
        return Template(
            dir=path,
            key=key,
            image=image,
            shape=shape,
            mac=meta["mac"],
            agent=bool(meta["agent"]),
            sshd_holds_keys=meta.get("sshd_holds_keys"),
            vlan_macs=tuple(meta.get("vlan_macs", ())),
            client_key=KeyPair.load(path / "id_ed25519"),
            host_key=KeyPair.load(path / "host_ed25519"),
        )

    @staticmethod
    def _problem(path: Path, key: str) -> str:
        """Why the template at ``path`` must not be used ("" if it may)."""
        try:
            meta = json.loads((path / "meta.json").read_text())
            if meta.get("format") != TEMPLATE_FORMAT or meta.get("key") != key:
                return "was made by another version or for other settings"
            for name in _CHECKED_FILES:
                if name not in meta["files"] and name == "ram" and meta.get("ram") is False:
                    continue  # a libvirt save image holds the RAM
                if _file_record(path / name) != meta["files"][name]:
                    return f"has a changed {name}"
            if _sha256(path / "state") != meta["state_sha256"]:
                return "has a corrupt saved state"
            check = subprocess.run(
                ["qemu-img", "check", "-q", "-f", "qcow2", str(path / "disk.qcow2")],
                capture_output=True,
                text=True,
                timeout=120,
            )
            if check.returncode != 0:
                return f"has a damaged disk ({(check.stderr or check.stdout).strip()[:200]})"
        except FileNotFoundError as exc:
            return f"is incomplete ({Path(str(exc.filename)).name} is missing)"
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return f"cannot be read ({exc})"
        return ""

    # -- building ----------------------------------------------------------------------

    def _build(
        self,
        name: str,
        key: str,
        image: Image,
        shape: Shape,
        timeout: float,
        runner: Backend | None = None,
        labels: Labels = (),
    ) -> Template:
        # We hold the lock: any half-made template of this name is from a dead run.
        for stale in self.root.glob(f".{name}.building-*"):
            shutil.rmtree(stale, ignore_errors=True)
        # Its RAM file fills as the guest runs (a full disk there would kill QEMU with
        # SIGBUS): room for all of it, plus the disk overlay and saved state.
        check_free_space(self.root, (shape.memory << 20) + MIN_FREE_SPACE, f"template {name}")
        work = self.root / f".{name}.building-{os.getpid()}"
        work.mkdir(mode=0o700)
        started = time.monotonic()
        self.progress(
            f"pytest-kvm: making template {name}: booting {image.name} once "
            f"({shape.memory} MiB, {shape.cpus} CPU{'s' if shape.cpus > 1 else ''}; "
            "later guests restore it)"
        )
        try:
            client = KeyPair.generate("pytest-kvm-template").save(work / "id_ed25519")
            host = KeyPair.generate(f"pytest-kvm-template-host-{key}").save(work / "host_ed25519")
            config = GuestConfig(
                image=image,
                memory=shape.memory,
                cpus=shape.cpus,
                network=parse_network(shape.network, f"template {name}"),
                boot_timeout=timeout,
                hostname=TEMPLATE_HOSTNAME,
                vlans=(None,) * shape.vlans,
                display=shape.display,
                tpm=shape.tpm,
                firmware=shape.firmware,
                arch=shape.arch,
                backend=runner.name if runner is not None else "qemu",
                runner=runner,
                labels=labels,
            )
            guest = Guest(self.run, config, "template", plan=BootPlan(work, client, host))
            with guest:  # starts it; closing removes all but the plan's files
                guest.run(SETTLE, timeout=timeout)
                repair_slow_boot(guest, name, timeout, self.progress)
                # Walk the path every clone takes first (sshd, PAM, a shell) on a new
                # connection, so its pages are in the saved page cache, not on disk.
                guest.reconnect()
                guest.run(WARM, timeout=timeout)
                agent = guest.agent_answers()
                facts = saved_facts(guest, timeout)
                guest.save_state(work / "state")
                if (work / VARS_NAME).exists():  # UEFI: clones copy the variables
                    fsync_path(work / VARS_NAME)
                shutil.copyfile(guest.serial_log, work / "serial.log")
                mac = guest.mac
                vlan_macs = guest.vlan_macs
            self._write_meta(work, key, image, shape, mac, agent, vlan_macs, extra=facts)
            fsync_path(work)
            os.rename(work, self.root / name)
            fsync_path(self.root)
        except BaseException as exc:
            shutil.rmtree(work, ignore_errors=True)
            if isinstance(exc, GuestError | ImageError):
                raise type(exc)(f"making template {name}: {exc}") from exc
            raise
        self.progress(f"pytest-kvm: template {name} ready in {time.monotonic() - started:.0f} s")
        template = self._load(self.root / name, key, image, shape)
        if template is None:
            raise KvmError(f"template {name} failed its own check right after it was made")
        return template

    @staticmethod
    def _write_meta(
        work: Path,
        key: str,
        image: Image,
        shape: Shape,
        mac: str,
        agent: bool,
        vlan_macs: tuple[str, ...] = (),
        extra: dict[str, object] | None = None,
    ) -> None:
        files = [name for name in _CHECKED_FILES if (work / name).exists() or name != "ram"]
        for name in files:
            fsync_path(work / name)
        meta = {
            "format": TEMPLATE_FORMAT,
            "key": key,
            "image": image_identity(image),
            "shape": asdict(shape),
            "qemu": qemu_version(),
            "mac": mac,
            "vlan_macs": list(vlan_macs),
            "agent": agent,
            "created": time.time(),
            "files": {name: _file_record(work / name) for name in files},
            **({} if "ram" in files else {"ram": False}),  # in the saved state (libvirt)
            "state_sha256": _sha256(work / "state"),
            **(extra or {}),  # a prepared snapshot's "base", "snapshot", ...
        }
        tmp = work / "meta.json.tmp"
        with tmp.open("w") as out:
            json.dump(meta, out, indent=2, sort_keys=True)
            out.flush()
            os.fsync(out.fileno())
        os.rename(tmp, work / "meta.json")


def saved_facts(guest: Guest, timeout: float) -> dict[str, object]:
    """What a guest about to be saved tells its clones in the template's meta, so that
    each need not ask it again through the guest agent."""
    holds = guest.run(HOLDS_HOST_KEYS, timeout=timeout).exit_status == 0
    return {"sshd_holds_keys": holds}


def gave_up_units(pid1_log: str) -> list[str]:
    """The units that systemd's own log (``PID1_LOG``: JSON lines) says it gave up on."""
    units: list[str] = []
    for line in pid1_log.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        message, unit = entry.get("MESSAGE"), entry.get("UNIT")
        if (
            isinstance(message, str)
            and isinstance(unit, str)
            and BOOT_GAVE_UP.search(message)
            and not unit.endswith(".device")  # a late device shows up by itself
            and unit not in units
        ):
            units.append(unit)
    return units


def repair_slow_boot(
    guest: Guest, name: str, timeout: float, progress: Callable[[str], object]
) -> None:
    """What systemd gave up on while this boot was slow starts again before the save."""
    if guest.init_system != "systemd":
        return
    units = gave_up_units(guest.run(PID1_LOG, timeout=timeout).stdout)
    if not units:
        return
    progress(
        f"pytest-kvm: template {name}: systemd gave up on {', '.join(units)} "
        "during a slow boot: starting them again"
    )
    quoted = " ".join(shlex.quote(unit) for unit in units)
    started = guest.run(f"systemctl reset-failed; systemctl start -- {quoted}", timeout=timeout)
    guest.run(SETTLE, timeout=timeout)
    if started.exit_status != 0:
        detail = (started.stderr or started.stdout).strip()
        progress(f"pytest-kvm: template {name}: not all of them started: {detail}")


def stale_reason(path: Path) -> str:
    """Why the template at ``path`` can never be used again ("" if it still can):
    its base image changed or is gone, QEMU changed, or its format is old."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("format") != TEMPLATE_FORMAT:
            return "made by another pytest-kvm version"
        image = meta["image"]
        base = Path(image["path"])
        if not base.exists():
            return f"its base image {base} is gone"
        st = base.stat()
        if (st.st_size, st.st_mtime_ns, st.st_ino) != (
            image["size"], image["mtime_ns"], image["inode"]
        ):  # fmt: skip
            return f"its base image {base} changed"
        if meta.get("qemu") != qemu_version():
            return f"made with {meta.get('qemu')}"
        if "base" in meta:  # a prepared snapshot (snapshot.py): its base template too
            return _stale_base(path.parent / meta["base"], meta.get("base_created"))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable ({exc})"
    return ""


def _stale_base(base: Path, created: object) -> str:
    """Why a snapshot over template ``base`` is stale ("" if it is not)."""
    if not (base / "meta.json").is_file():
        return f"its base template {base.name} is gone"
    if json.loads((base / "meta.json").read_text()).get("created") != created:
        return f"its base template {base.name} was made again since"
    why = stale_reason(base)
    return f"its base template {base.name} is stale ({why})" if why else ""


def use_lock(root: Path, name: str) -> Path:
    """The file a run holds a shared lock on while it clones from template ``name``."""
    return root / f".{name}.use"


@dataclass
class Pruned:
    """What :func:`prune` removed, and what it left because it is in use, and why."""

    removed: list[tuple[Path, str]]
    in_use: list[tuple[Path, str]]


def prune(root: Path, everything: bool = False) -> Pruned:
    """Remove stale templates (all, with ``everything``) and half-made ones of dead
    builders; skip any that a live run clones from or another process builds or checks."""
    result = Pruned([], [])
    if not root.is_dir():
        return result
    older = superseded(root)
    for path in sorted(root.iterdir()):
        if not path.is_dir():
            continue
        name = path.name
        if name.startswith("."):  # .<name>.building-<pid>
            name, _, _ = name[1:].rpartition(".building-")
            why = "half made"
        else:
            why = "removed on request" if everything else stale_reason(path) or older.get(path, "")
        if not why:
            continue
        busy = _remove_unless_busy(root, name, path, complete=why != "half made")
        if busy:
            result.in_use.append((path, busy))
        else:
            result.removed.append((path, why))
    return result


def superseded(root: Path) -> dict[Path, str]:
    """Prepared snapshots that a newer build of the same name over the same base
    replaced (its setup or inputs changed): path -> why."""
    newest: dict[tuple[str, str], tuple[float, Path]] = {}
    older: dict[Path, str] = {}
    bases: dict[Path, Path] = {}
    for meta_path in sorted(root.glob("*/meta.json")):
        try:
            meta = json.loads(meta_path.read_text())
            if "snapshot" not in meta:
                continue
            which, made = (str(meta["snapshot"]), str(meta["base"])), float(meta["created"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        path, kept = meta_path.parent, newest.get(which)
        bases[path] = root / which[1]
        if kept is None or made > kept[0]:
            if kept is not None:
                older[kept[1]] = f"replaced by a newer build of snapshot {which[0]}"
            newest[which] = (made, path)
        else:
            older[path] = f"replaced by a newer build of snapshot {which[0]}"
    changed = True
    while changed:  # and snapshots over those, whatever order prune meets them in
        changed = False
        for path, base in bases.items():
            if base in older and path not in older:
                older[path] = f"its base template {base.name} was replaced"
                changed = True
    return older


def _remove_unless_busy(root: Path, name: str, path: Path, complete: bool) -> str:
    """Remove template ``path`` unless it is busy; why it is busy ("" if removed)."""
    lock = FileLock(str(root / f".{name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return "being made or checked by another process"
    try:  # the lock files stay: a waiter may hold them open
        if not complete:
            shutil.rmtree(path, ignore_errors=True)
            return ""
        with unused(use_lock(root, name)) as free:
            if not free:
                return "in use by a running test session"
            shutil.rmtree(path, ignore_errors=True)
            return ""
    finally:
        lock.release()


def pool_copies(root: Path) -> dict[str, str]:
    """What the libvirt backend's pools hold of the templates under ``root``: the key
    of each one's state and disk copy (``state-<sha20>``, ``disk-<sha20>``, see
    ``backends/libvirt/storage.py``) -> the template's name."""
    from .backends.libvirt.storage import file_sha256

    copies: dict[str, str] = {}
    for meta_path in sorted(root.glob("*/meta.json")):
        path = meta_path.parent
        try:
            state = str(json.loads(meta_path.read_text())["state_sha256"])
            copies[f"state-{state[:20]}"] = path.name
            copies[f"disk-{file_sha256(path / 'disk.qcow2')[:20]}"] = path.name
        except (OSError, ValueError, KeyError, TypeError):
            continue  # unreadable: prune removed it, or another process just did
    return copies


def snapshot_of(path: Path) -> tuple[str, str] | None:
    """(snapshot name, base template name) if the template at ``path`` is a prepared
    snapshot (``kvm_snapshot``); else None."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        return (str(meta["snapshot"]), str(meta["base"])) if "snapshot" in meta else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def list_templates(root: Path) -> list[tuple[Path, int]]:
    """Complete templates under ``root`` with their disk use in bytes."""
    found = []
    for path in sorted(root.glob("*/meta.json")):
        used = 0
        for file in path.parent.iterdir():
            with contextlib.suppress(OSError):
                used += file.stat().st_blocks * 512
        found.append((path.parent, used))
    return found
