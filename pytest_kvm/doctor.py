"""`pytest-kvm doctor`: what works on this machine, the default mode's requirements
first, then the optional parts with how to install them."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import accel, firmware, ocr, tpm
from . import arch as arches
from .errors import KvmError
from .images import foreign

# Shown by ``pytest-kvm doctor`` as the image of the default mode.
DOCTOR_IMAGE = "debian-12"
# Free space the default mode needs in the cache: the built image (~0.7 GiB), a
# template per guest shape (its RAM file: 1 GiB at the default size), layers, kernels.
DOCTOR_MIN_FREE_GIB = 5.0
# A libguestfs appliance boots in ~15 s under TCG; a hang (no force_tcg) lasts minutes.
GUESTFS_PROBE_TIMEOUT = 240.0

_GUESTFS_PROBE = """
import guestfs
g = guestfs.GuestFS(python_return_dict=True, close_on_exit=False)
g.add_drive_scratch(16 * 1024 * 1024)
g.launch()
v = g.version()
g.shutdown()
g.close()
print("libguestfs %d.%d.%d" % (v["major"], v["minor"], v["release"]))
"""


@dataclass(frozen=True)
class Check:
    """One line of ``pytest-kvm doctor``."""

    what: str
    ok: bool
    detail: str
    required: bool = True  # the default mode needs it
    hint: str = ""  # what to install or do, shown when not ok
    note: str = ""  # shown whatever the outcome
    optional: bool = False  # listed apart: features beyond the default mode

    @property
    def mark(self) -> str:
        if self.ok:
            return "[ok]"
        return "[!!]" if self.required else "[--]"


def _run(
    argv: list[str], timeout: float = 30.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str] | None:
    """Run a probe; None if it could not be started or did not finish in time."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    except (OSError, subprocess.TimeoutExpired):
        return None


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _tool_search_path() -> str:
    """PATH plus the sbin directories (mkfs.ext4, sfdisk): as the image builder looks."""
    return os.pathsep.join(
        [os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"]
    )


def _qemu_checks() -> list[Check]:
    checks = []
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        checks.append(Check("qemu-system-x86_64", False, "not found",
                            hint="apt-get install qemu-system-x86"))  # fmt: skip
        checks.append(Check("user networking", False, "needs qemu-system-x86_64",
                            hint="apt-get install qemu-system-x86"))  # fmt: skip
        return checks
    version = _run([qemu, "--version"])
    detail = _first_line(version.stdout) if version and version.returncode == 0 else ""
    if not detail:
        checks.append(Check("qemu-system-x86_64", False, f"{qemu} does not run (--version failed)",
                            hint="apt-get install --reinstall qemu-system-x86"))  # fmt: skip
    else:
        checks.append(Check("qemu-system-x86_64", True, f"{detail} ({qemu})"))
    netdevs = _run([qemu, "-netdev", "help"])
    kinds = set(netdevs.stdout.split()) if netdevs else set()
    if "user" in kinds:
        checks.append(Check("user networking", True,
                            "-netdev user (SSH forwarded to 127.0.0.1) is available"))  # fmt: skip
    else:
        checks.append(Check("user networking", False,
                            f"{qemu} has no -netdev user (built without libslirp)",
                            hint="apt-get install qemu-system-x86 (Debian's has it)"))  # fmt: skip
    return checks


def _accel_check() -> Check:
    """Which accelerator guests get, and why KVM is not used where it is not."""
    qemu = shutil.which("qemu-system-x86_64")
    accels = _run([qemu, "-accel", "help"]) if qemu else None
    has_tcg = accels is not None and "tcg" in accels.stdout.split()
    choice = accel.choose("auto")
    if choice.name == "kvm":
        return Check("accelerator", True, f"kvm ({choice.reason})")
    reason = choice.reason
    if qemu is None:
        return Check("accelerator", False, f"none: qemu-system-x86_64 is missing ({reason})",
                     hint="apt-get install qemu-system-x86")  # fmt: skip
    if not has_tcg:
        return Check("accelerator", False, f"none: KVM not usable ({reason}) and "
                     f"{qemu} has no TCG", hint="apt-get install qemu-system-x86")  # fmt: skip
    if "kvm_pvm" in reason:
        note = "nothing to install: this host's KVM cannot run standard guest kernels"
    elif "does not exist" in reason:
        note = ("for KVM: enable (nested) virtualisation and load kvm_intel or kvm_amd "
                "(modprobe kvm_intel)")  # fmt: skip
    elif "readable and writable" in reason:
        note = "for KVM: add this user to group 'kvm' (usermod -aG kvm USER), log in again"
    else:
        note = "for KVM: see why the probe failed above"
    return Check("accelerator", True,
                 f"tcg: guests run under software emulation, slower (waits scaled x3); "
                 f"KVM not usable: {reason}", note=note)  # fmt: skip


def _qemu_img_check() -> Check:
    path = shutil.which("qemu-img")
    if path is None:
        return Check("qemu-img", False, "not found", hint="apt-get install qemu-utils")
    version = _run([path, "--version"])
    detail = _first_line(version.stdout) if version and version.returncode == 0 else ""
    if not detail:
        return Check("qemu-img", False, f"{path} does not run (--version failed)",
                     hint="apt-get install --reinstall qemu-utils")  # fmt: skip
    return Check("qemu-img", True, f"{detail} ({path})")


def _python_modules_check() -> Check:
    import importlib.util

    missing = []
    for module, dist in (("paramiko", "paramiko"), ("qemu.qmp", "qemu-qmp"),
                         ("pycdlib", "pycdlib"), ("filelock", "filelock")):  # fmt: skip
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(dist)
    if missing:
        return Check("python libraries", False, f"missing: {', '.join(missing)}",
                     hint=f"pip install {' '.join(missing)}")  # fmt: skip
    return Check("python libraries", True, "paramiko, qemu.qmp, pycdlib (seeds), filelock")


def _builder_checks(cache: Path) -> list[Check]:
    """What building the default catalog image needs; only to rebuild if it is built."""
    from .errors import KvmConfigError
    from .images.builder import GRUB_PLATFORM_DIR, HOST_TOOLS
    from .images.mirror import debian_mirror
    from .images.recipe import catalog_names
    from .images.store import catalog_path

    if DOCTOR_IMAGE not in catalog_names():
        return [Check(f"image {DOCTOR_IMAGE}", False, "its recipe is missing from the catalog",
                      hint="reinstall pytest-kvm")]  # fmt: skip
    image = catalog_path(DOCTOR_IMAGE, cache)
    built = image.exists()
    if built:
        checks = [Check(f"image {DOCTOR_IMAGE}", True, f"built: {image}")]
        why = "(only to rebuild it)"
    else:
        checks = [Check(f"image {DOCTOR_IMAGE}", True,
                        f"not built yet; the first test run builds it into {image.parent}, "
                        "with the tools below")]  # fmt: skip
        why = f"(builds {DOCTOR_IMAGE})"
    search = _tool_search_path()
    for tool, package in HOST_TOOLS.items():
        if tool == "qemu-img":
            continue  # its own line above
        path = shutil.which(tool, path=search)
        checks.append(Check(f"{tool} {why}", path is not None, path or "not found",
                            required=not built, hint=f"apt-get install {package}"))  # fmt: skip
    boot_img = GRUB_PLATFORM_DIR / "boot.img"
    checks.append(Check(f"GRUB i386-pc {why}", boot_img.is_file(),
                        str(boot_img) if boot_img.is_file() else f"{boot_img} not found",
                        required=not built, hint="apt-get install grub-pc-bin"))  # fmt: skip
    root = os.geteuid() == 0
    checks.append(Check(f"root {why}", root, "running as root" if root else "not root "
                        "(mmdebstrap --mode=root and file ownership need it)",
                        required=not built, hint="run the first build as root: "
                        f"sudo pytest-kvm image build {DOCTOR_IMAGE}"))  # fmt: skip
    try:
        mirror = debian_mirror()
        checks.append(Check(f"Debian mirror {why}", True, mirror))
    except KvmConfigError as exc:
        checks.append(Check(f"Debian mirror {why}", False, str(exc), required=not built,
                            hint="set PYTEST_KVM_MIRROR=http://HOST/debian"))  # fmt: skip
    return checks


def _cache_check(cache: Path) -> Check:
    probe = cache
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    hint = "free some space, or point --kvm-cache / PYTEST_KVM_CACHE at a bigger disk"
    if not os.access(probe, os.W_OK | os.X_OK):
        return Check("cache", False, f"{cache}: {probe} is not writable by this user",
                     hint="choose a writable --kvm-cache DIR")  # fmt: skip
    free = shutil.disk_usage(probe).free / 2**30
    enough = free >= DOCTOR_MIN_FREE_GIB
    detail = f"{cache}: {free:.1f} GiB free (needs {DOCTOR_MIN_FREE_GIB:g} GiB)"
    return Check("cache disk", enough, detail, hint=hint)


def _guestfs_check(force_tcg: bool, quick: bool) -> Check:
    what = "libguestfs (optional: marker files=/hostname=/run=, images without cloud-init, "
    what += "journals of failed tests)"
    install = GUESTFS_HINT
    try:
        import guestfs  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
    except ImportError:
        return Check(what, False, "the Python binding is not importable", False, install,
                     optional=True)  # fmt: skip
    env = dict(os.environ, LIBGUESTFS_BACKEND="direct")
    how = "direct backend"
    if force_tcg:
        # As customize.py does: libguestfs' own KVM check is wrong where KVM cannot run
        # a standard kernel, and the appliance would hang for minutes.
        env["LIBGUESTFS_BACKEND_SETTINGS"] = "force_tcg"
        how += ", LIBGUESTFS_BACKEND_SETTINGS=force_tcg"
    if quick:
        return Check(what, True, f"binding importable; appliance not launched (--quick); "
                     f"pytest-kvm runs it with {how}", required=False, optional=True)  # fmt: skip
    ok, detail = _launch_guestfs(env)
    if ok:
        return Check(what, True, f"{detail}: an appliance launched ({how})", required=False,
                     optional=True)  # fmt: skip
    env_text = "LIBGUESTFS_BACKEND_SETTINGS=force_tcg " if force_tcg else ""
    return Check(what, False, f"an appliance did not launch ({how}): {detail}", False,
                 f"{env_text}libguestfs-test-tool shows why", optional=True)  # fmt: skip


def _launch_guestfs(env: dict[str, str]) -> tuple[bool, str]:
    """Launch a libguestfs appliance on a scratch disk in a child process (its own
    session, so a hung appliance is ended with it): (launched, version or why not)."""
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-c", _GUESTFS_PROBE],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env, start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=GUESTFS_PROBE_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return False, f"no appliance after {GUESTFS_PROBE_TIMEOUT:.0f} s"
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        return False, _last_line(err) or f"exit status {proc.returncode}"
    return True, f"{_last_line(out)} in {seconds:.0f} s"


def extra_hint(extra: str) -> str:
    """How to install the extra ``extra`` (pyproject's optional-dependencies)."""
    return f"pip install 'pytest-kvm[{extra}]'"


#: Debian's libguestfs binding: not on the package index, so no extra installs it.
GUESTFS_HINT = (
    "apt-get install python3-guestfs (Debian's binding; a virtualenv needs "
    "--system-site-packages to see it)"
)
#: What building libvirt-python (it has no wheels) needs from Debian.
LIBVIRT_BUILD_PACKAGES = "libvirt-dev pkg-config gcc python3-dev"
LIBVIRT_HINT = (
    f"{extra_hint('libvirt')}; building libvirt-python needs "
    f"apt-get install {LIBVIRT_BUILD_PACKAGES}"
)


@dataclass(frozen=True)
class Extra:
    """An optional part that an extra of pytest-kvm installs."""

    extra: str  # pytest-kvm[extra]
    module: str  # what is imported
    dist: str  # the distribution the extra brings
    feature: str  # what it gives


EXTRAS = (
    Extra("xdist", "xdist", "pytest-xdist", "-n N, --kvm-dist-by-image"),
    Extra("testinfra", "testinfra", "pytest-testinfra", "guest.host"),
    Extra("html", "pytest_html", "pytest-html", "failed guests' artifacts in --html reports"),
)


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _extra_check(part: Extra) -> Check:
    from importlib import metadata

    what = f"{part.dist} (optional: {part.feature})"
    if not _importable(part.module):
        return Check(what, False, "not installed", False, extra_hint(part.extra), optional=True)
    try:
        detail = f"{part.dist} {metadata.version(part.dist)}"
    except metadata.PackageNotFoundError:
        detail = f"{part.module} importable"
    return Check(what, True, detail, required=False, optional=True)


def _qemu_nbd_check() -> Check:
    path = shutil.which("qemu-nbd")
    what = "qemu-nbd (optional: libguestfs on LUKS-encrypted images)"
    return Check(what, path is not None, path or "not found", required=False,
                 hint="apt-get install qemu-utils", optional=True)  # fmt: skip


def _tesseract_check() -> Check:
    path = shutil.which(ocr.TESSERACT)
    what = "tesseract (optional: screen_text/wait_for_text on a graphical screen, by OCR)"
    return Check(what, path is not None, path or "not found", required=False,
                 hint=f"apt-get install {ocr.PACKAGE}", optional=True)  # fmt: skip


def _swtpm_check() -> Check:
    path = shutil.which(tpm.SWTPM)
    what = "swtpm (optional: tpm=True, an emulated TPM 2.0 per guest)"
    return Check(what, path is not None, path or "not found", required=False,
                 hint=f"apt-get install {tpm.SWTPM_PACKAGE}", optional=True)  # fmt: skip


def _arch_checks() -> list[Check]:
    """Optional: aarch64 and riscv64 guests (arch.py): each one's QEMU and firmware,
    with the Debian package of what is missing."""
    checks = []
    parts = {
        "aarch64": [(firmware.AAVMF_DIR / "AAVMF_CODE.fd", "qemu-efi-aarch64"),
                    (firmware.AAVMF_DIR / "AAVMF_VARS.fd", "qemu-efi-aarch64")],
        "riscv64": [(firmware.OPENSBI, "opensbi"), (firmware.UBOOT, "u-boot-qemu")],
    }  # fmt: skip
    for name, files in parts.items():
        spec = arches.get(name)
        missing = [] if shutil.which(spec.qemu) else [(spec.qemu, spec.package)]
        missing += [(str(path), package) for path, package in files if not path.is_file()]
        image = {"aarch64": "debian-12-arm64", "riscv64": "debian-13-riscv64"}[name]
        what = f"{name} guests (optional: images like {image}, under TCG)"
        detail = f"{spec.qemu} and {', '.join(str(p) for p, _ in files)}"
        packages = sorted({package for _, package in missing})
        checks.append(Check(
            what, not missing,
            detail if not missing else "missing: " + ", ".join(str(m) for m, _ in missing),
            required=False, hint=f"apt-get install {' '.join(packages)}", optional=True,
        ))  # fmt: skip
        # building such an image: its programs run here under qemu-user-static
        problem = foreign.binfmt_problem(foreign.ARCHES[spec.debian])
        checks.append(Check(
            f"building {image} (optional: its programs under qemu-user, binfmt_misc)",
            problem is None, problem or f"qemu-{foreign.ARCHES[spec.debian].qemu_user} registered",
            required=False, optional=True,
            hint="as root: apt-get install qemu-user-static; bash scripts/setup.sh registers it",
        ))  # fmt: skip
    return checks


def _libvirt_check() -> Check:
    """Optional: --kvm-backend libvirt."""
    from .backends.libvirt import connect, load_libvirt
    from .config import default_uri

    what = "libvirt (optional: --kvm-backend libvirt)"
    try:
        load_libvirt()
    except KvmError as exc:
        return Check(what, False, str(exc), False, LIBVIRT_HINT, optional=True)
    uri = default_uri()
    try:
        conn = connect(uri)
        version = conn.getLibVersion()
    except KvmError as exc:
        return Check(what, False, str(exc), False,
                     "apt-get install libvirt-daemon-system; systemctl start libvirtd "
                     "(or pass --kvm-uri)", optional=True)  # fmt: skip
    v = f"{version // 1_000_000}.{version // 1000 % 1000}.{version % 1000}"
    return Check(what, True, f"{uri} answers (libvirt {v})", required=False, optional=True)


def doctor_checks(cache: Path, quick: bool = False) -> list[Check]:
    """Everything ``pytest-kvm doctor`` looks at, required (default mode) ones first."""
    checks = _qemu_checks()
    acc = _accel_check()
    checks += [acc, _qemu_img_check(), _python_modules_check()]
    checks += _builder_checks(cache)
    checks.append(_cache_check(cache))
    force_tcg = not acc.detail.startswith("kvm")
    checks += [_guestfs_check(force_tcg, quick), _qemu_nbd_check(), _libvirt_check()]
    checks += [_tesseract_check(), _swtpm_check()]
    checks += _arch_checks()
    checks += [_extra_check(part) for part in EXTRAS]
    return checks


def cmd_doctor(args: argparse.Namespace) -> int:
    """What works here; exit 0 only when the default mode (qemu backend, user
    networking, a locally built Debian image) works."""
    checks = doctor_checks(Path(args.cache), quick=getattr(args, "quick", False))
    print(f"default mode (qemu backend, user networking, catalog image {DOCTOR_IMAGE}):")
    optional_heading = False
    for check in checks:
        if check.optional and not optional_heading:
            print("\noptional (not needed by the default mode):")
            optional_heading = True
        print(f"{check.mark} {check.what}: {check.detail}")
        if not check.ok and check.hint:
            print(f"     install: {check.hint}" if "install" in check.hint or
                  check.hint.startswith("pip ") else f"     fix: {check.hint}")  # fmt: skip
        if check.note:
            print(f"     note: {check.note}")
    failed = [c.what for c in checks if c.required and not c.ok]
    if failed:
        print(f"\nthe default mode does not work here; missing: {', '.join(failed)}")
        return 1
    print(f"\nthe default mode works here: pytest --kvm-image {DOCTOR_IMAGE}")
    return 0
