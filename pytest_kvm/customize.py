"""libguestfs work on disks that are not running: customise, inject access, inspect.

Three jobs, all through libguestfs' Python binding (Debian's ``python3-guestfs``):

- ``customized_image``: write files, set the host name and run commands in a new
  qcow2 layer over an image, before any guest boots from it. The layer is cached
  under ``<cache>/layers/``, keyed by the base image and the customisation's
  content, so the same customisation is built once.
- ``inject_access``: for images without cloud-init, put the run's SSH key, the
  guest's pinned host key, its host name and a DHCP network into its overlay.
- ``GuestDisk``: a stopped guest's overlay, opened read-only: files and the
  systemd journal of its last boot.

A libguestfs handle runs a small appliance VM; it takes its drives before it is
launched and none after, so one handle serves one disk (``GuestDisk`` keeps its
handle for every call). Under TCG it is forced to TCG (``force_tcg``): its own KVM
probe is wrong on these hosts and it would hang for minutes.

LUKS-encrypted qcow2 chains are exported decrypted to the appliance by
``qemu-nbd`` on a private UNIX socket, with the key read by QEMU from the secret
file: libguestfs has no way to pass a qcow2 key itself.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import posixpath
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

from filelock import FileLock

from .errors import ImageError, KvmConfigError, KvmUnavailable
from .images import Image
from .images.overlay import check_qemu_path, create_overlay, key_secret_opts, secret_object
from .reaper import Lease, lease_dir, owner_fields
from .spawn import spawn
from .util import process_start, rename_synced

GUESTFS_PACKAGE = "python3-guestfs"
# Bump when what a layer holds for the same input changes, so old layers are not used.
CUSTOMIZE_FORMAT = 1
JOURNAL_DIR = "/var/log/journal"
_MODE_MAX = 0o7777


def load_guestfs(why: str = "this") -> ModuleType:
    """The guestfs module, or KvmUnavailable naming the package to install."""
    try:
        import guestfs  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise KvmUnavailable(
            f"libguestfs is not installed, and {why} needs it (Debian package: {GUESTFS_PACKAGE})"
        ) from None
    return guestfs  # type: ignore[no-any-return,unused-ignore]


def guestfs_available() -> bool:
    try:
        load_guestfs()
    except KvmUnavailable:
        return False
    return True


# -- what to change --------------------------------------------------------------------

_HOSTNAME = re.compile(
    r"^(?=.{1,63}$)[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*$"
)


def check_hostname(hostname: object, where: str = "") -> None:
    if not isinstance(hostname, str) or not _HOSTNAME.match(hostname):
        raise KvmConfigError(
            f"{where + ': ' if where else ''}hostname={hostname!r} is not a host name "
            "(letters, digits and '-', dot-separated labels, at most 63 characters)"
        )


@dataclass(frozen=True)
class FileSpec:
    path: str  # absolute, in the guest
    content: bytes
    mode: int = 0o644


@dataclass(frozen=True)
class Customization:
    """Files, a host name and commands applied to a disk before it boots, in that order."""

    files: tuple[FileSpec, ...] = ()
    hostname: str | None = None
    run: tuple[str, ...] = ()

    @classmethod
    def build(
        cls,
        files: Mapping[str, Any] | None = None,
        hostname: str | None = None,
        run: str | Sequence[str] | None = None,
        where: str = "customize",
    ) -> Customization:
        """Validate user input: ``files`` maps guest paths to text, bytes, a local
        ``Path`` to copy, or ``(content, mode)``; ``run`` is one command or several."""
        specs: list[FileSpec] = []
        if files is not None:
            if not isinstance(files, Mapping):
                raise KvmConfigError(f"{where}: files= must map guest paths to contents")
            for guest_path, value in files.items():
                specs.append(_file_spec(guest_path, value, where))
        if hostname is not None:
            check_hostname(hostname, where)
        commands: tuple[str, ...] = ()
        if run is not None:
            if not isinstance(run, str | Sequence):
                raise KvmConfigError(
                    f"{where}: run= takes a shell command string or a list of them, "
                    f"not {type(run).__name__}"
                )
            commands = (run,) if isinstance(run, str) else tuple(run)
            for command in commands:
                if not isinstance(command, str) or not command.strip() or "\0" in command:
                    raise KvmConfigError(
                        f"{where}: run= takes shell command strings; {command!r} is not one"
                    )
        return cls(tuple(sorted(specs, key=lambda f: f.path)), hostname, commands)

    def __bool__(self) -> bool:
        return bool(self.files or self.hostname or self.run)

    def merged(self, other: Customization) -> Customization:
        """``other`` on top of this: its files replace ours, its commands run after."""
        files = {f.path: f for f in self.files}
        files.update({f.path: f for f in other.files})
        return Customization(
            tuple(sorted(files.values(), key=lambda f: f.path)),
            other.hostname or self.hostname,
            self.run + other.run,
        )

    def digest(self) -> str:
        doc = {
            "files": [[f.path, hashlib.sha256(f.content).hexdigest(), f.mode] for f in self.files],
            "hostname": self.hostname,
            "run": list(self.run),
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    def summary(self) -> str:
        parts = []
        if self.files:
            parts.append(f"{len(self.files)} file{'s' if len(self.files) != 1 else ''}")
        if self.hostname:
            parts.append(f"hostname {self.hostname}")
        if self.run:
            parts.append(f"{len(self.run)} command{'s' if len(self.run) != 1 else ''}")
        return ", ".join(parts) or "nothing"


def _file_spec(guest_path: object, value: Any, where: str) -> FileSpec:
    if not isinstance(guest_path, str) or not guest_path.startswith("/") or "\0" in guest_path:
        raise KvmConfigError(f"{where}: files= key {guest_path!r} is not an absolute guest path")
    norm = posixpath.normpath(guest_path)
    if norm != guest_path or norm == "/":
        raise KvmConfigError(
            f"{where}: files= key {guest_path!r} is not a plain path to a file "
            "(no '..', '.', '//' or trailing '/')"
        )
    mode: int | None = None
    content = value
    if isinstance(value, tuple):
        if len(value) != 2 or not isinstance(value[1], int) or isinstance(value[1], bool):
            raise KvmConfigError(f"{where}: files[{guest_path!r}]: use (content, mode)")
        content, mode = value
        if not 0 <= mode <= _MODE_MAX:
            raise KvmConfigError(f"{where}: files[{guest_path!r}]: mode {mode:o} is not a mode")
    if isinstance(content, str):
        data = content.encode()
    elif isinstance(content, bytes | bytearray):
        data = bytes(content)
    elif isinstance(content, os.PathLike):
        local = Path(content)
        if not local.is_file():
            raise KvmConfigError(
                f"{where}: files[{guest_path!r}]: local file {str(local)!r} does not exist"
            )
        data = local.read_bytes()
        if mode is None:
            mode = 0o755 if local.stat().st_mode & 0o111 else 0o644
    else:
        raise KvmConfigError(
            f"{where}: files[{guest_path!r}]: give text, bytes, a pathlib.Path or "
            f"(content, mode), not {type(content).__name__}"
        )
    return FileSpec(norm, data, 0o644 if mode is None else mode)


# -- opening a disk --------------------------------------------------------------------


@dataclass(frozen=True)
class DiskSource:
    """A disk for libguestfs: a file, maybe a LUKS-encrypted qcow2 chain."""

    path: Path
    format: str = "qcow2"
    encrypted: tuple[bool, ...] = ()
    secret: Path | None = None

    @classmethod
    def of(cls, image: Image) -> DiskSource:
        return cls(image.path, image.format, image.encrypted, image.secret)


class _NbdExport:
    """``qemu-nbd`` serving a decrypted view of an encrypted chain on a private socket.

    It must not outlive us (it serves the disk in the clear): it gets the parent-death
    signal, like QEMU, and a lease, so that ``reap`` ends it if that ever fails."""

    def __init__(self, source: DiskSource, readonly: bool) -> None:
        self.source = source
        self.readonly = readonly
        self.dir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.lease: Lease | None = None

    @property
    def socket(self) -> Path:
        assert self.dir is not None
        return self.dir / "nbd.sock"

    def start(self, timeout: float = 120) -> None:
        if shutil.which("qemu-nbd") is None:
            raise KvmUnavailable("qemu-nbd is not installed (Debian package: qemu-utils)")
        assert self.source.secret is not None
        check_qemu_path(str(self.source.path))
        self.dir = Path(tempfile.mkdtemp(prefix="pytest-kvm-nbd-"))
        os.chmod(self.dir, 0o700)
        self.lease = Lease.create(lease_dir(), self.dir.name, {
            "kind": "nbd", "name": str(self.source.path), "dir": str(self.dir),
            "socket": str(self.socket), **owner_fields(),
        })  # fmt: skip
        opts = f"driver=qcow2,file.filename={self.source.path}," + key_secret_opts(
            self.source.encrypted
        )
        argv = ["qemu-nbd", "--object", secret_object(self.source.secret), "--image-opts",
                "--socket", str(self.socket), "--persistent", "--shared=1"]  # fmt: skip
        if self.readonly:
            argv.append("--read-only")
        argv.append(opts)
        self.proc = spawn(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.lease.update(qemu_pid=self.proc.pid, qemu_start=process_start(self.proc.pid))
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                self.close()
                raise ImageError(
                    f"qemu-nbd could not open {str(self.source.path)!r}: {err.strip()[-300:]}"
                )
            if time.monotonic() > deadline:
                self.close()
                raise ImageError(f"qemu-nbd did not serve {str(self.source.path)!r} in time")
            time.sleep(0.05)

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
        if self.lease is not None:
            self.lease.remove()
            self.lease = None


class DiskHandle:
    """A launched libguestfs appliance on one disk, with the guest's file systems
    mounted at ``/``. The constructor records; ``open()`` launches; ``close()`` is
    idempotent and, for a writable disk, flushes everything to it."""

    def __init__(
        self, source: DiskSource, *, readonly: bool, force_tcg: bool, what: str = ""
    ) -> None:
        self.source = source
        self.readonly = readonly
        self.force_tcg = force_tcg
        self.what = what or str(source.path)
        self.g: Any = None
        self._nbd: _NbdExport | None = None
        self.launch_seconds = 0.0

    def open(self) -> DiskHandle:
        guestfs = load_guestfs("reading or changing disks offline")
        t0 = time.monotonic()
        try:
            g = guestfs.GuestFS(python_return_dict=True, close_on_exit=False)
            self.g = g
            g.set_backend("direct")
            if self.force_tcg:
                g.set_backend_settings(["force_tcg"])
            if any(self.source.encrypted):
                if self.source.secret is None:
                    raise ImageError(f"{self.what} is encrypted and no secret was given")
                self._nbd = _NbdExport(self.source, self.readonly)
                self._nbd.start()
                g.add_drive_opts(
                    "", format="raw", protocol="nbd", server=[f"unix:{self._nbd.socket}"],
                    readonly=self.readonly,
                )  # fmt: skip
            else:
                g.add_drive_opts(str(self.source.path), format=self.source.format,
                                 readonly=self.readonly)  # fmt: skip
            g.launch()
            self._mount()
        except RuntimeError as exc:  # what the binding raises for libguestfs errors
            self.close()
            raise ImageError(f"libguestfs could not open {self.what}: {exc}") from None
        except BaseException:
            self.close()
            raise
        self.launch_seconds = time.monotonic() - t0
        return self

    def _mount(self) -> None:
        g = self.g
        roots = g.inspect_os()
        if not roots:
            raise ImageError(f"{self.what}: libguestfs found no operating system on it")
        mountpoints = g.inspect_get_mountpoints(roots[0])
        for mountpoint in sorted(mountpoints, key=len):
            device = mountpoints[mountpoint]
            with contextlib.suppress(RuntimeError):  # e.g. a swap entry or a gone device
                if self.readonly:
                    g.mount_ro(device, mountpoint)
                else:
                    g.mount(device, mountpoint)

    def close(self) -> None:
        g, self.g = self.g, None
        try:
            if g is not None:
                with contextlib.suppress(RuntimeError):
                    if not self.readonly:
                        g.umount_all()
                    g.shutdown()  # waits for the appliance: the disk is complete after it
                g.close()
        finally:
            if self._nbd is not None:
                self._nbd.close()
                self._nbd = None

    def __enter__(self) -> DiskHandle:
        return self.open() if self.g is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- changes ---------------------------------------------------------------------

    def write_file(self, path: str, content: bytes, mode: int, dir_mode: int = 0o755) -> None:
        g = self.g
        parent = posixpath.dirname(path)
        if not g.is_dir(parent):
            g.mkdir_p(parent)
            g.chmod(dir_mode, parent)
        g.write(path, content)
        g.chmod(mode, path)

    def apply(self, custom: Customization) -> None:
        g = self.g
        for spec in custom.files:
            try:
                self.write_file(spec.path, spec.content, spec.mode)
            except RuntimeError as exc:
                raise ImageError(f"{self.what}: cannot write {spec.path}: {exc}") from None
        if custom.hostname:
            self.set_hostname(custom.hostname)
        for number, command in enumerate(custom.run):
            try:
                g.sh(command)
            except RuntimeError as exc:
                raise ImageError(
                    f"{self.what}: run[{number}] {command!r} failed in the image: {exc}"
                ) from None

    def set_hostname(self, hostname: str) -> None:
        g = self.g
        g.write("/etc/hostname", hostname.encode() + b"\n")
        if g.is_file("/etc/hosts"):
            lines = g.read_file("/etc/hosts").decode(errors="replace").splitlines()
            kept = [line for line in lines if not line.startswith("127.0.1.1")]
            g.write("/etc/hosts", ("\n".join([*kept, f"127.0.1.1\t{hostname}"]) + "\n").encode())


# -- customisation layers ---------------------------------------------------------------


def layer_key(image: Image, custom: Customization) -> str:
    payload = json.dumps(
        {"format": CUSTOMIZE_FORMAT, "image": image.identity(), "custom": custom.digest()},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def customized_image(
    image: Image,
    custom: Customization,
    cache: Path,
    force_tcg: bool,
    progress: Callable[[str], None] = print,
) -> Image:
    """``image`` with ``custom`` applied: a cached qcow2 layer over it, built once
    (under a file lock, so parallel workers build it once too)."""
    key = layer_key(image, custom)
    encrypted = (True, *image.encrypted) if image.is_encrypted else ()
    path = cache / "layers" / f"{image.name}-{key}.qcow2"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            progress(f"pytest-kvm: customising {image.name} ({custom.summary()}) into {path}")
            t0 = time.monotonic()
            work = path.with_name(f".{path.name}.building-{os.getpid()}")
            try:
                create_overlay(image.path, image.format, work, size=image.virtual_size,
                               secret=image.secret if image.is_encrypted else None)  # fmt: skip
                source = DiskSource(work, "qcow2", encrypted, image.secret)
                with DiskHandle(source, readonly=False, force_tcg=force_tcg,
                                what=f"the customisation of {image.name}") as disk:  # fmt: skip
                    disk.apply(custom)
                rename_synced(work, path)
            finally:
                work.unlink(missing_ok=True)
            progress(f"pytest-kvm: customised {image.name} in {time.monotonic() - t0:.1f} s")
    return replace(
        image,
        name=f"{image.name}+{key[:8]}",
        path=path,
        format="qcow2",
        encrypted=encrypted,
    )


def prune_layers(cache: Path) -> list[Path]:
    """Remove layers whose base image is gone (their backing file no longer exists)."""
    from .images.overlay import image_info

    removed = []
    for path in sorted((cache / "layers").glob("*.qcow2")):
        try:
            backing = str(image_info(path).get("full-backing-filename") or "")
        except ImageError:
            backing = ""
        if backing and not Path(backing).exists():
            path.unlink(missing_ok=True)
            Path(str(path) + ".lock").unlink(missing_ok=True)
            removed.append(path)
    return removed


# -- images without cloud-init ------------------------------------------------------------


def facts_path(image_path: Path) -> Path:
    """Where the catalog build records what it knows of an image, next to it."""
    return image_path.with_name(image_path.name + ".facts.json")


def _file_identity(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def write_facts(image_path: Path, cloud_init: bool, record: Path | None = None) -> None:
    record = record or facts_path(image_path)
    doc = {"file": _file_identity(image_path), "cloud_init": cloud_init}
    tmp = record.with_name(f".{record.name}.{os.getpid()}")
    tmp.write_text(json.dumps(doc) + "\n")
    os.replace(tmp, record)


def _read_facts(image_path: Path, record: Path) -> bool | None:
    try:
        doc = json.loads(record.read_text())
        if doc["file"] == _file_identity(image_path):
            return bool(doc["cloud_init"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def probe_cloud_init(image: Image, cache: Path, force_tcg: bool) -> bool:
    """Whether ``image`` runs cloud-init at boot. A catalog build says so next to
    the image; any other image is looked at once with libguestfs and the answer is
    kept in ``<cache>/layers/``, keyed by the image file's identity."""
    known = _read_facts(image.path, facts_path(image.path))
    if known is not None:
        return known
    key = hashlib.sha256(str(image.path.resolve()).encode()).hexdigest()[:16]
    record = cache / "layers" / f"facts-{image.name}-{key}.json"
    known = _read_facts(image.path, record)
    if known is not None:
        return known
    with DiskHandle(DiskSource.of(image), readonly=True, force_tcg=force_tcg,
                    what=f"image {image.name}") as disk:  # fmt: skip
        g = disk.g
        has = any(g.is_file(p) for p in ("/usr/bin/cloud-init", "/bin/cloud-init")) and not (
            g.exists("/etc/cloud/cloud-init.disabled")
        )
    record.parent.mkdir(parents=True, exist_ok=True)
    write_facts(image.path, has, record)
    return has


NETWORKD_FILE = "/etc/systemd/network/90-pytest-kvm.network"
# KeepConfiguration=dhcp: a DHCP client restart never drops the address a test
# reaches a bridge guest at (as in the catalog images).
NETWORKD_CONFIG = b"[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\nKeepConfiguration=dhcp\n"
SSHD_DROP_IN = b"PasswordAuthentication no\nKbdInteractiveAuthentication no\n"


@dataclass(frozen=True)
class Access:
    """What cloud-init's seed would have given a guest, for an image without it."""

    user: str
    authorized_key: str
    host_key_private: str
    host_key_public: str
    hostname: str | None  # None: keep the image's


def inject_access(disk: DiskHandle, access: Access) -> None:
    """Key, pinned host key, host name and DHCP on every NIC, written into the disk."""
    g = disk.g
    home = "/root" if access.user == "root" else f"/home/{access.user}"
    if not g.is_dir(home):
        raise ImageError(f"{disk.what}: user {access.user!r} has no home {home} in the image")
    disk.write_file(f"{home}/.ssh/authorized_keys", access.authorized_key.encode() + b"\n",
                    0o600, dir_mode=0o700)  # fmt: skip
    g.chmod(0o700, f"{home}/.ssh")
    if access.user != "root":
        uid, gid = _ids(g, access.user)
        for path in (f"{home}/.ssh", f"{home}/.ssh/authorized_keys"):
            g.chown(uid, gid, path)
    if not g.is_dir("/etc/ssh"):
        raise ImageError(f"{disk.what}: no /etc/ssh in the image; is openssh-server installed?")
    for name in g.ls("/etc/ssh"):
        if name.startswith("ssh_host_") and "_key" in name:
            g.rm(f"/etc/ssh/{name}")  # sshd must offer the pinned key and no other
    disk.write_file("/etc/ssh/ssh_host_ed25519_key", access.host_key_private.encode(), 0o600)
    disk.write_file("/etc/ssh/ssh_host_ed25519_key.pub",
                    access.host_key_public.encode() + b"\n", 0o644)  # fmt: skip
    disk.write_file("/etc/ssh/sshd_config.d/10-pytest-kvm.conf", SSHD_DROP_IN, 0o644)
    if access.hostname is not None:
        disk.set_hostname(access.hostname)
    unit = next(
        (p for p in ("/lib/systemd/system/systemd-networkd.service",
                     "/usr/lib/systemd/system/systemd-networkd.service") if g.is_file(p)),
        None,
    )  # fmt: skip
    if unit is None:
        raise ImageError(
            f"{disk.what}: the image has neither cloud-init nor systemd-networkd, so "
            "pytest-kvm cannot set up its network; install one of them in the image"
        )
    disk.write_file(NETWORKD_FILE, NETWORKD_CONFIG, 0o644)
    wants = "/etc/systemd/system/multi-user.target.wants"
    g.mkdir_p(wants)
    link = f"{wants}/systemd-networkd.service"
    if not g.exists(link) and not g.is_symlink(link):
        g.ln_s(unit, link)


def _ids(g: Any, user: str) -> tuple[int, int]:
    for line in g.read_file("/etc/passwd").decode(errors="replace").splitlines():
        fields = line.split(":")
        if len(fields) > 3 and fields[0] == user:
            return int(fields[2]), int(fields[3])
    raise ImageError(f"user {user!r} is not in the image's /etc/passwd")


# -- a stopped guest's disk ------------------------------------------------------------


class GuestDisk:
    """A stopped guest's disk, read-only. The appliance starts at the first call and
    serves every later one; ``close()`` (the guest's close does it) stops it."""

    def __init__(self, source: DiskSource, force_tcg: bool, what: str) -> None:
        self._handle = DiskHandle(source, readonly=True, force_tcg=force_tcg, what=what)

    @property
    def _g(self) -> Any:
        if self._handle.g is None:
            self._handle.open()
        return self._handle.g

    def read_bytes(self, path: str) -> bytes:
        return bytes(self._call(lambda g: g.read_file(path), path))

    def read_text(self, path: str, encoding: str = "utf-8") -> str:
        return self.read_bytes(path).decode(encoding, errors="replace")

    def ls(self, path: str) -> list[str]:
        return sorted(self._call(lambda g: g.ls(path), path))

    def exists(self, path: str) -> bool:
        return bool(self._call(lambda g: g.exists(path), path))

    def _call(self, action: Callable[[Any], Any], path: str) -> Any:
        g = self._g  # the appliance starts at the first call
        try:
            return action(g)
        except RuntimeError as exc:
            raise FileNotFoundError(f"{self._handle.what}: {path}: {exc}") from None

    def journal(self) -> str:
        """The systemd journal of the guest's last boot, as ``journalctl -o short`` lines.

        Needs a persistent journal (``/var/log/journal``); what the guest had not
        written to its disk when it stopped is not there."""
        return "\n".join(self.journal_entries()) + "\n"

    def journal_entries(self) -> list[str]:
        g = self._g
        if not g.is_dir(JOURNAL_DIR):
            raise FileNotFoundError(
                f"{self._handle.what}: no persistent journal ({JOURNAL_DIR} is missing)"
            )
        entries: list[tuple[str, int, str]] = []
        g.journal_open(JOURNAL_DIR)
        try:
            g.journal_set_data_threshold(4096)
            while g.journal_next():
                fields = {f["attrname"]: f["attrval"] for f in g.journal_get()}
                usec = g.journal_get_realtime_usec()
                entries.append((_text(fields.get("_BOOT_ID")), usec, _format_entry(fields, usec)))
        finally:
            g.journal_close()
        if not entries:
            return []
        last_boot = max(entries, key=lambda e: e[1])[0]
        return [line for boot, _, line in sorted(entries, key=lambda e: e[1]) if boot == last_boot]

    def close(self) -> None:
        self._handle.close()


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _format_entry(fields: Mapping[str, bytes | str], usec: int) -> str:
    stamp = datetime.datetime.fromtimestamp(usec / 1e6, tz=datetime.UTC).strftime("%b %d %H:%M:%S")
    ident = _text(fields.get("SYSLOG_IDENTIFIER")) or _text(fields.get("_COMM")) or "?"
    pid = _text(fields.get("_PID"))
    host = _text(fields.get("_HOSTNAME"))
    message = _text(fields.get("MESSAGE"))
    return f"{stamp} {host} {ident}{f'[{pid}]' if pid else ''}: {message}"
