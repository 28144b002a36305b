"""Settings and their resolution: marker > command line > environment > ini > default."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .arch import parse_arch
from .customize.spec import Customization
from .errors import KvmConfigError
from .firmware import parse_firmware
from .network import NetworkSpec as NetworkSpec  # re-exported: its old home
from .share import SharedDir, parse_shares

BACKENDS = ("qemu", "libvirt")
ACCELS = ("auto", "kvm", "tcg")
# What the error gate (--kvm-fail-on) can look for in a guest after each test's call.
FAIL_ON_KINDS = ("panic", "oops", "coredump", "journal-err")


@dataclass(frozen=True)
class Settings:
    """Everything that decides how guests are started; resolved once, then read-only."""

    images: tuple[str, ...] = ()
    # Where ``images`` came from, for error messages: "command line --kvm-image", ...
    image_source: str = ""
    backend: str = "qemu"
    # The libvirt URI of this process: one of ``uris``, by xdist worker number.
    uri: str = ""
    uris: tuple[str, ...] = ()
    # libvirt: the storage pool for images and overlays ("" = our own "pytest-kvm").
    pool: str = ""
    network: NetworkSpec = field(default_factory=lambda: NetworkSpec("user"))
    accel: str = "auto"
    memory: int = 1024
    cpus: int = 2
    # --kvm-firmware: auto (BIOS), bios, uefi, uefi-secure (firmware.py)
    firmware: str = "auto"
    # Where ``firmware`` came from, for errors found later (an image without a signed
    # boot path): "command line --kvm-firmware", "<test> (@pytest.mark.kvm firmware=)"...
    firmware_source: str = "default"
    # --kvm-arch: auto (the image's own) or what the image must be (arch.py); and
    # where it came from, for the error when an image is another architecture.
    arch: str = "auto"
    arch_source: str = "default"
    boot_timeout: float = 300.0
    snapshot: bool = True
    keep_on_failure: bool = False
    # Wait for Enter after a failed call, guests running (pause.py); no xdist.
    pause_on_failure: bool = False
    # A failed test's guests with a display keep a screen recording (recording.py).
    record: bool = False
    # A VNC display on 127.0.0.1 (password in a private file) for every guest.
    vnc: bool = False
    # An emulated TPM 2.0 per guest (swtpm; tpm.py), carried by templates.
    tpm: bool = False
    # Never download images: URLs and downloaded catalog images must be in the cache.
    offline: bool = False
    artifacts: Path = Path(".pytest-kvm/artifacts")
    cache: Path = field(default_factory=lambda: default_cache_dir())
    kernel_args: str = ""
    image_secret: Path | None = None
    # Marker files=, hostname=, run=: applied with libguestfs before the guest boots.
    customize: Customization = field(default_factory=Customization)
    # --kvm-fail-on: guest-side errors (FAIL_ON_KINDS) that fail a test after its call.
    fail_on: frozenset[str] = frozenset({"panic"})
    # Marker share=: host folders mounted in the guest (share.py); marker only.
    share: tuple[SharedDir, ...] = ()

    def with_marker(self, kwargs: Mapping[str, Any], where: str) -> Settings:
        """Apply ``@pytest.mark.kvm(...)`` overrides, validating each value."""
        changes: dict[str, Any] = {}
        custom = {k: kwargs[k] for k in CUSTOMIZE_KEYS if k in kwargs}
        if custom:
            changes["customize"] = self.customize.merged(
                Customization.build(**custom, where=f"{where} (@pytest.mark.kvm)")
            )
        for key, value in kwargs.items():
            if key in CUSTOMIZE_KEYS:
                continue
            if key not in MARKER_KEYS:
                raise KvmConfigError(
                    f"{where}: unknown argument {key}= in @pytest.mark.kvm; "
                    f"known: {', '.join(sorted(MARKER_KEYS))}"
                )
            if key == "image":
                images = (value,) if isinstance(value, str | Path) else value
                if (
                    not isinstance(images, list | tuple)
                    or not images
                    or not all(isinstance(i, str | Path) and str(i).strip() for i in images)
                ):
                    raise KvmConfigError(
                        f"{where} (@pytest.mark.kvm image=): {value!r} is not an image "
                        "(a path or catalog name) or a non-empty list of them"
                    )
                changes["images"] = tuple(str(i).strip() for i in images)
                continue
            if key == "share":
                changes["share"] = parse_shares(value, f"{where} (@pytest.mark.kvm share=)")
                continue
            opt = OPTIONS[key]
            changes[key] = opt.parse(value, f"{where} (@pytest.mark.kvm {key}=)")
            if key in ("firmware", "arch"):
                changes[f"{key}_source"] = f"{where} (@pytest.mark.kvm {key}=)"
        return replace(self, **changes)


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pytest-kvm"


def _positive_int(low: int, high: int) -> Callable[[Any, str], int]:
    def parse(value: Any, where: str) -> int:
        try:
            number = int(str(value).strip())
        except ValueError:
            raise KvmConfigError(f"{where}: {value!r} is not a whole number") from None
        if not low <= number <= high:
            raise KvmConfigError(f"{where}: {number} is out of range ({low}..{high})")
        return number

    return parse


def _seconds(value: Any, where: str) -> float:
    try:
        number = float(str(value).strip())
    except ValueError:
        raise KvmConfigError(f"{where}: {value!r} is not a number of seconds") from None
    if not 0 < number <= 24 * 3600:
        raise KvmConfigError(f"{where}: {number} seconds is out of range (0..86400]")
    return number


def _choice(choices: tuple[str, ...]) -> Callable[[Any, str], str]:
    def parse(value: Any, where: str) -> str:
        text = str(value).strip().lower()
        if text not in choices:
            raise KvmConfigError(f"{where}: {value!r} is not one of {', '.join(choices)}")
        return text

    return parse


def _bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise KvmConfigError(f"{where}: {value!r} is not a boolean (use true/false)")


def _path(value: Any, where: str) -> Path:
    text = str(value)
    if not text.strip() or "\0" in text:
        raise KvmConfigError(f"{where}: {value!r} is not a usable path")
    return Path(text).expanduser()


def _secret_file(value: Any, where: str) -> Path:
    """A file holding an image's key: it must exist, be ours and be private, like an
    SSH private key; its bytes are the key exactly (no newline is stripped)."""
    path = _path(value, where).resolve()
    try:
        st = path.stat()
    except OSError as exc:
        raise KvmConfigError(f"{where}: secret file {str(path)!r}: {exc.strerror}") from None
    if not path.is_file():
        raise KvmConfigError(f"{where}: secret file {str(path)!r} is not a regular file")
    if st.st_uid != os.geteuid():
        raise KvmConfigError(f"{where}: secret file {str(path)!r} is not owned by this user")
    if st.st_mode & 0o077:
        raise KvmConfigError(
            f"{where}: secret file {str(path)!r} is readable by others "
            f"(mode {st.st_mode & 0o777:o}); chmod 600 it"
        )
    if st.st_size == 0:
        raise KvmConfigError(f"{where}: secret file {str(path)!r} is empty")
    if "," in str(path):
        raise KvmConfigError(f"{where}: secret file {str(path)!r}: QEMU cannot take ',' in paths")
    return path


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise KvmConfigError(f"{where}: {value!r} is not text")
    text = value
    if "\0" in text or "\n" in text:
        raise KvmConfigError(f"{where}: {value!r} contains a NUL or newline")
    return text


def parse_fail_on(value: Any, where: str) -> frozenset[str]:
    """``panic,oops,coredump,journal-err`` (commas or spaces; a list in a marker);
    ``none`` or nothing turns the gate off."""
    if isinstance(value, str):
        items = value.replace(",", " ").split()
    elif isinstance(value, list | tuple | set | frozenset) and all(
        isinstance(v, str) for v in value
    ):
        items = [part for v in value for part in v.replace(",", " ").split()]
    else:
        raise KvmConfigError(f"{where}: {value!r} is not a list of {', '.join(FAIL_ON_KINDS)}")
    kinds = {item.strip().lower() for item in items}
    if kinds == {"none"}:
        return frozenset()
    unknown = sorted(kinds - set(FAIL_ON_KINDS))
    if unknown:
        shown = "" if str(value).strip().lower() == unknown[0] else f"{value!r}: "
        raise KvmConfigError(
            f"{where}: {shown}{unknown[0]!r} is not one of {', '.join(FAIL_ON_KINDS)} (or none)"
        )
    return frozenset(kinds)


def _pool(value: Any, where: str) -> str:
    """A libvirt storage pool name: not empty, no '/'."""
    text = _text(value, where)
    if not text.strip() or "/" in text:
        raise KvmConfigError(f"{where}: {value!r} is not a storage pool name")
    return text


# A Linux interface name: at most 15 bytes, no '/', ':' or white space.
_BRIDGE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_LIBVIRT_NET = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# The helper QEMU runs for -netdev bridge (Debian's qemu-system-common ships it).
DEFAULT_BRIDGE_HELPER = "/usr/lib/qemu/qemu-bridge-helper"
_NETWORK_FORMS = "use user, bridge=NAME, bridge=NAME,helper[=PATH] or libvirt=NETWORK"


def parse_network(value: Any, where: str) -> NetworkSpec:
    if isinstance(value, NetworkSpec):
        return value
    text = str(value).strip()
    if text == "user":
        return NetworkSpec("user")
    head, _, options = text.partition(",")
    kind, sep, name = head.partition("=")
    if sep and kind == "bridge":
        if not _BRIDGE_NAME.match(name):
            raise KvmConfigError(
                f"{where}: {value!r}: {name!r} is not a bridge name (1 to 15 letters, "
                "digits, '.', '-' or '_')"
            )
        helper = ""
        if options:
            opt, has_path, path = options.partition("=")
            if opt != "helper" or (has_path and (not path.startswith("/") or "," in path)):
                raise KvmConfigError(
                    f"{where}: {value!r}: after the bridge name only helper or "
                    "helper=/ABSOLUTE/PATH (without commas) may follow"
                )
            helper = path if has_path else DEFAULT_BRIDGE_HELPER
        return NetworkSpec("bridge", name, helper)
    if sep and kind == "libvirt" and not options and _LIBVIRT_NET.match(name):
        return NetworkSpec("libvirt", name)
    raise KvmConfigError(f"{where}: {value!r} is not a network spec; {_NETWORK_FORMS}")


@dataclass(frozen=True)
class Option:
    """One setting: its CLI flag, parser and default."""

    name: str
    parse: Callable[[Any, str], Any]
    help: str
    metavar: str = ""

    @property
    def flag(self) -> str:
        return "--kvm-" + self.name.replace("_", "-")

    @property
    def ini(self) -> str:
        return "kvm_" + self.name

    @property
    def env(self) -> str:
        return "PYTEST_KVM_" + self.name.upper()


_URI = re.compile(r"^[a-z][a-z0-9]*(\+[a-z0-9]+)?://\S*$")


def _uris(value: Any, where: str) -> tuple[str, ...]:
    """One URI, several (repeated option, a list in ini), or several separated by
    spaces (environment)."""
    items = value.split() if isinstance(value, str) else [str(v) for v in value]
    if not items:
        raise KvmConfigError(f"{where}: no libvirt URI given")
    for item in items:
        if not _URI.match(item):
            raise KvmConfigError(
                f"{where}: {item!r} is not a libvirt URI (qemu:///system, "
                "qemu+ssh://user@host/system)"
            )
    return tuple(items)


OPTIONS: dict[str, Option] = {
    o.name: o
    for o in (
        Option("backend", _choice(BACKENDS), "who runs guests: qemu (default) or libvirt", "NAME"),
        Option("uri", _uris, "libvirt connection URI; repeatable: xdist workers take turns", "URI"),
        Option("pool", _pool, "libvirt storage pool for images and overlays (pytest-kvm)", "NAME"),
        Option(
            "network",
            parse_network,
            "user (default), bridge=NAME[,helper[=PATH]], libvirt=NETWORK",
            "SPEC",
        ),
        Option("accel", _choice(ACCELS), "auto (default), kvm or tcg", "ACCEL"),
        Option("memory", _positive_int(128, 1024 * 1024), "guest memory in MiB (1024)", "MIB"),
        Option("cpus", _positive_int(1, 256), "guest vCPUs (2)", "N"),
        Option(
            "firmware",
            parse_firmware,
            "auto (default: BIOS), bios, uefi (OVMF) or uefi-secure (OVMF, Secure Boot)",
            "NAME",
        ),
        Option(
            "arch",
            parse_arch,
            "auto (default: the image's own), x86_64, aarch64 or riscv64: the "
            "architecture guests must be (an image of another is an error)",
            "NAME",
        ),
        Option("boot_timeout", _seconds, "seconds to SSH-ready, scaled under TCG (300)", "S"),
        Option("snapshot", _bool, "restore guests from a booted template", ""),
        Option("keep_on_failure", _bool, "leave a failed test's guest running", ""),
        Option(
            "pause_on_failure",
            _bool,
            "on a failed call, print how to reach its guests and wait for Enter before "
            "teardown (not under xdist)",
            "",
        ),
        Option(
            "record",
            _bool,
            "a failed test's guests with a display keep a recording of their screen "
            "(an animated PNG in the artifacts)",
            "",
        ),
        Option("vnc", _bool, "a VNC display on 127.0.0.1, with a password, per guest", ""),
        Option("tpm", _bool, "an emulated TPM 2.0 per guest (swtpm), carried by templates", ""),
        Option("offline", _bool, "never download images: use only what is in the cache", ""),
        Option("artifacts", _path, "where failed tests' logs go", "DIR"),
        Option("cache", _path, "built and downloaded images (~/.cache/pytest-kvm)", "DIR"),
        Option("kernel_args", _text, "extra kernel command line (forces a real boot)", "ARGS"),
        Option(
            "image_secret",
            _secret_file,
            "private file (0600) holding the key of LUKS-encrypted qcow2 images",
            "FILE",
        ),
        Option(
            "fail_on",
            parse_fail_on,
            "guest errors that fail a test after its call: panic (default), oops, "
            "coredump, journal-err, comma-separated; none turns it off",
            "LIST",
        ),
    )
}
CUSTOMIZE_KEYS = ("files", "hostname", "run")
MARKER_KEYS = frozenset(
    {
        "image",
        "memory",
        "cpus",
        "firmware",
        "arch",
        "network",
        "snapshot",
        "kernel_args",
        "vnc",
        "tpm",
        "fail_on",
        "share",
        *CUSTOMIZE_KEYS,
    }
)


def uri_for_worker(uris: tuple[str, ...], worker: str | None) -> str:
    """xdist worker gwN takes URI N modulo their number; the controller the first."""
    if not uris:
        return ""
    number = int(worker[2:]) if worker and worker.startswith("gw") and worker[2:].isdigit() else 0
    return uris[number % len(uris)]


def default_uri() -> str:
    """libvirt's URI when none is given: the system daemon for root."""
    return "qemu:///system" if os.geteuid() == 0 else "qemu:///session"


def resolve(
    cli: Mapping[str, Any],
    env: Mapping[str, str],
    ini: Callable[[str], Any],
) -> Settings:
    """Build Settings from the command line, environment and ini, in that precedence.

    ``cli`` maps option names to values (None when not given); ``ini(key)`` returns
    the ini value or None/empty when unset.
    """
    values: dict[str, Any] = {}
    for name, opt in OPTIONS.items():
        raw: Any = None
        where = ""
        if cli.get(name) is not None:
            raw, where = cli[name], f"command line {opt.flag}"
        elif env.get(opt.env):
            raw, where = env[opt.env], f"environment {opt.env}"
        else:
            ini_value = ini(opt.ini)
            if ini_value not in (None, "", []):
                raw, where = ini_value, f"ini {opt.ini}"
        if raw is not None:
            values[name] = opt.parse(raw, where)
            if name in ("firmware", "arch"):
                values[f"{name}_source"] = where

    images: tuple[str, ...] = ()
    if cli.get("image"):
        images = tuple(cli["image"])
        where = "command line --kvm-image"
    elif env.get("PYTEST_KVM_IMAGE"):
        images = tuple(i for i in env["PYTEST_KVM_IMAGE"].split(",") if i.strip())
        where = "environment PYTEST_KVM_IMAGE"
        if not images:
            raise KvmConfigError(f"{where}: {env['PYTEST_KVM_IMAGE']!r} names no image")
    else:
        ini_images = ini("kvm_image")
        if ini_images:
            images = tuple(ini_images if isinstance(ini_images, list) else [ini_images])
            where = "ini kvm_image"
    for image in images:
        if not str(image).strip() or "\0" in str(image):
            raise KvmConfigError(f"{where}: {image!r} is not an image path, URL or name")
    values["images"] = tuple(str(i).strip() for i in images)
    values["image_source"] = where if images else ""
    values["uris"] = values.pop("uri", None) or (default_uri(),)
    values["uri"] = uri_for_worker(values["uris"], env.get("PYTEST_XDIST_WORKER"))
    return Settings(**values)
