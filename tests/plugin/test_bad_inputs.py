"""A table of bad inputs: each ends the run at configuration or collection with one
clear line naming the value and where it came from, exit status 4 (usage error), no
traceback, and nothing left behind (no run directory, no QEMU)."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

GUEST_TEST = """
def test_guest(kvm_guest):
    pass
"""
MISSING_IMAGE = '/no such dir/it\'s "quoted" $(x).qcow2'
MISSING_SECRET = "/no such dir/secret 'key'"


def marked(marker: str) -> str:
    return f"""
import pytest

{marker}
def test_guest(kvm_guest):
    pass
"""


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...] = ()
    needles: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    ini: str = ""
    test: str = GUEST_TEST


IMAGE = "--kvm-image={dir}/ok.qcow2"
CASES = [
    # -- options on the command line
    Case("memory-abc", ("--kvm-memory=abc",),
         ("command line --kvm-memory: 'abc' is not a whole number",)),
    Case("memory-too-small", ("--kvm-memory=64",),
         ("command line --kvm-memory: 64 is out of range (128..1048576)",)),
    Case("cpus-0", ("--kvm-cpus=0",), ("command line --kvm-cpus: 0 is out of range (1..256)",)),
    Case("cpus-fraction", ("--kvm-cpus=1.5",),
         ("command line --kvm-cpus: '1.5' is not a whole number",)),
    Case("accel-foo", ("--kvm-accel=foo",),
         ("command line --kvm-accel: 'foo' is not one of auto, kvm, tcg",)),
    Case("firmware-efi", ("--kvm-firmware=efi",),
         ("command line --kvm-firmware: 'efi' is not one of auto, bios, uefi, uefi-secure, "
          "u-boot",)),
    Case("firmware-env", (), ("environment PYTEST_KVM_FIRMWARE: 'secure' is not one of auto",),
         env={"PYTEST_KVM_FIRMWARE": "secure"}),
    Case("arch-sparc", ("--kvm-arch=sparc64",),
         ("command line --kvm-arch: architecture 'sparc64' is not one of auto, x86_64, "
          "aarch64, riscv64",)),
    Case("arch-env", (), ("environment PYTEST_KVM_ARCH: architecture 'arm' is not one of",),
         env={"PYTEST_KVM_ARCH": "arm"}),
    Case("arch-mismatch", ("--kvm-image=debian-12", "--kvm-arch=arm64"),
         ("command line --kvm-arch: architecture 'aarch64', but image 'debian-12' is x86_64 "
          "(its catalog recipe says x86_64)",)),
    Case("marker-arch", (IMAGE,),
         ("test_guest (@pytest.mark.kvm arch=): architecture 'mips' is not one of",),
         test=marked('@pytest.mark.kvm(arch="mips")')),
    Case("backend-bar", ("--kvm-backend=bar",),
         ("command line --kvm-backend: 'bar' is not one of qemu, libvirt",)),
    Case("network-weird", ("--kvm-network=weird",),
         ("command line --kvm-network: 'weird' is not a network spec; use user, bridge=NAME",)),
    Case("network-empty-bridge", ("--kvm-network=bridge=",),
         ("command line --kvm-network: 'bridge=': '' is not a bridge name",)),
    Case("network-relative-helper", ("--kvm-network=bridge=br0,helper=relative",),
         ("'bridge=br0,helper=relative': after the bridge name only helper or "
          "helper=/ABSOLUTE/PATH",)),
    Case("network-helper-comma", ("--kvm-network=bridge=br0,helper=/a,br=evil",),
         ("'bridge=br0,helper=/a,br=evil'", "(without commas)")),
    Case("network-libvirt-slash", ("--kvm-network=libvirt=a/b",),
         ("command line --kvm-network: 'libvirt=a/b' is not a network spec",)),
    Case("boot-timeout-negative", ("--kvm-boot-timeout=-1",),
         ("command line --kvm-boot-timeout: -1.0 seconds is out of range (0..86400]",)),
    Case("boot-timeout-nan", ("--kvm-boot-timeout=nan",),
         ("command line --kvm-boot-timeout: nan seconds is out of range",)),
    Case("boot-timeout-text", ("--kvm-boot-timeout=soon",),
         ("command line --kvm-boot-timeout: 'soon' is not a number of seconds",)),
    Case("kernel-args-newline", ("--kvm-kernel-args=quiet\nsingle",),
         ("command line --kvm-kernel-args: 'quiet\\nsingle' contains a NUL or newline",)),
    Case("pool-empty", ("--kvm-pool=",), ("command line --kvm-pool: '' is not a storage pool",)),
    Case("artifacts-empty", ("--kvm-artifacts=",),
         ("command line --kvm-artifacts: '' is not a usable path",)),
    # -- environment and ini
    Case("env-memory", (), ("environment PYTEST_KVM_MEMORY: '1GB' is not a whole number",),
         env={"PYTEST_KVM_MEMORY": "1GB"}),
    Case("env-snapshot", (), ("environment PYTEST_KVM_SNAPSHOT: 'maybe' is not a boolean",),
         env={"PYTEST_KVM_SNAPSHOT": "maybe"}),
    Case("env-image-only-commas", (), ("environment PYTEST_KVM_IMAGE: ' , ' names no image",),
         env={"PYTEST_KVM_IMAGE": " , "}),
    Case("env-image-missing", (),
         ("environment PYTEST_KVM_IMAGE: image '/nope/x.qcow2' does not exist",),
         env={"PYTEST_KVM_IMAGE": "/nope/x.qcow2"}),
    Case("env-uri-blank", ("--kvm-backend=libvirt", IMAGE),
         ("environment PYTEST_KVM_URI: no libvirt URI given",), env={"PYTEST_KVM_URI": " "}),
    Case("ini-cpus", (), ("ini kvm_cpus: 'many' is not a whole number",), ini="kvm_cpus = many"),
    Case("ini-keep", (), ("ini kvm_keep_on_failure: 'perhaps' is not a boolean",),
         ini="kvm_keep_on_failure = perhaps"),
    Case("env-pause", (), ("environment PYTEST_KVM_PAUSE_ON_FAILURE: 'later' is not a boolean",),
         env={"PYTEST_KVM_PAUSE_ON_FAILURE": "later"}),
    Case("ini-pause", (), ("ini kvm_pause_on_failure: 'perhaps' is not a boolean",),
         ini="kvm_pause_on_failure = perhaps"),
    Case("env-record", (), ("environment PYTEST_KVM_RECORD: 'video' is not a boolean",),
         env={"PYTEST_KVM_RECORD": "video"}),
    Case("ini-record", (), ("ini kvm_record: 'sometimes' is not a boolean",),
         ini="kvm_record = sometimes"),
    Case("env-tpm", (), ("environment PYTEST_KVM_TPM: 'maybe' is not a boolean",),
         env={"PYTEST_KVM_TPM": "maybe"}),
    Case("ini-tpm", (), ("ini kvm_tpm: '2.0' is not a boolean",), ini="kvm_tpm = 2.0"),
    Case("marker-tpm", (IMAGE,),
         ("(@pytest.mark.kvm tpm=): 'tpm2' is not a boolean",),
         test=marked("@pytest.mark.kvm(tpm='tpm2')")),
    Case("ini-image-unknown", (),
         ("ini kvm_image: image 'debian-99': unknown catalog image; known: debian-11, debian-12",),
         ini="kvm_image = debian-99"),
    Case("ini-bridge-too-long", (),
         ("ini kvm_network: 'bridge=this-name-is-too-long'", "is not a bridge name"),
         ini="kvm_network = bridge=this-name-is-too-long"),
    # -- marker arguments
    Case("marker-unknown-key", (IMAGE,),
         ("test_guest: unknown argument memroy= in @pytest.mark.kvm; known: arch, cpus,",),
         test=marked("@pytest.mark.kvm(memroy=512)")),
    Case("marker-positional", (IMAGE,), ("@pytest.mark.kvm takes keyword arguments only",),
         test=marked('@pytest.mark.kvm("debian-12")')),
    Case("marker-cpus-text", (IMAGE,),
         ("test_guest (@pytest.mark.kvm cpus=): 'two' is not a whole number",),
         test=marked('@pytest.mark.kvm(cpus="two")')),
    Case("marker-memory-list", (IMAGE,),
         ("(@pytest.mark.kvm memory=): [1] is not a whole number",),
         test=marked("@pytest.mark.kvm(memory=[1])")),
    Case("marker-image-int", (IMAGE,),
         ("test_guest (@pytest.mark.kvm image=): 42 is not an image",),
         test=marked("@pytest.mark.kvm(image=42)")),
    Case("marker-image-empty-list", (IMAGE,),
         ("(@pytest.mark.kvm image=): [] is not an image (a path or catalog name) or a "
          "non-empty list",),
         test=marked("@pytest.mark.kvm(image=[])")),
    Case("marker-image-unknown", (IMAGE,),
         ("test_guest (@pytest.mark.kvm image=): image 'debian-99': unknown catalog image",),
         test=marked('@pytest.mark.kvm(image="debian-99")')),
    Case("marker-image-missing-quoted", (IMAGE,),
         (f"(@pytest.mark.kvm image=): image {MISSING_IMAGE!r} does not exist",),
         test=marked(f"@pytest.mark.kvm(image={MISSING_IMAGE!r})")),
    Case("marker-kernel-args-int", (IMAGE,),
         ("(@pytest.mark.kvm kernel_args=): 5 is not text",),
         test=marked("@pytest.mark.kvm(kernel_args=5)")),
    Case("marker-run-int", (IMAGE,),
         ("(@pytest.mark.kvm): run= takes a shell command string or a list of them, not int",),
         test=marked("@pytest.mark.kvm(run=42)")),
    Case("marker-hostname", (IMAGE,),
         ("(@pytest.mark.kvm): hostname='bad host' is not a host name",),
         test=marked('@pytest.mark.kvm(hostname="bad host")')),
    # -- --kvm-fail-on and kvm_allow (the error gate)
    Case("fail-on-cli", ("--kvm-fail-on=panic,segfault",),
         ("command line --kvm-fail-on: 'panic,segfault': 'segfault' is not one of panic, "
          "oops, coredump, journal-err (or none)",)),
    Case("fail-on-env", (), ("environment PYTEST_KVM_FAIL_ON: 'oops;coredump'",),
         env={"PYTEST_KVM_FAIL_ON": "oops;coredump"}),
    Case("fail-on-ini", (), ("ini kvm_fail_on: 'warnings' is not one of",),
         ini="kvm_fail_on = warnings"),
    Case("marker-fail-on", (IMAGE,),
         ("(@pytest.mark.kvm fail_on=): 42 is not a list of panic, oops, coredump, journal-err",),
         test=marked("@pytest.mark.kvm(fail_on=42)")),
    Case("marker-allow-bad-regex", (IMAGE,),
         ("@pytest.mark.kvm_allow('oops (['): not a regular expression",),
         test=marked('@pytest.mark.kvm_allow("oops ([")')),
    Case("marker-allow-empty", (IMAGE,),
         ("@pytest.mark.kvm_allow: give one or more regular expressions, no keywords",),
         test=marked("@pytest.mark.kvm_allow()")),
    Case("marker-firmware-unknown", (IMAGE,),
         ("test_guest (@pytest.mark.kvm firmware=): 'ovmf' is not one of auto, bios, uefi",),
         test=marked('@pytest.mark.kvm(firmware="ovmf")')),
    Case("marker-files-not-a-map", (IMAGE,),
         ("(@pytest.mark.kvm): files= must map guest paths to contents",),
         test=marked("@pytest.mark.kvm(files=3)")),
    Case("marker-files-relative", (IMAGE,),
         ("files= key 'etc/x' is not an absolute guest path",),
         test=marked('@pytest.mark.kvm(files={"etc/x": "y"})')),
    Case("marker-share-missing", (IMAGE,),
         ("test_guest (@pytest.mark.kvm share=): host folder '/no such dir/x' does not exist",),
         test=marked('@pytest.mark.kvm(share={"/no such dir/x": "/mnt/x"})')),
    Case("marker-share-file", (IMAGE,),
         ("(@pytest.mark.kvm share=): host folder '{dir}/ok.qcow2' is not a directory",),
         test=marked('@pytest.mark.kvm(share={"{dir}/ok.qcow2": "/mnt/x"})')),
    Case("marker-share-relative", (IMAGE,),
         ("(@pytest.mark.kvm share=): guest path 'mnt/x' for '/tmp' is not an absolute path",),
         test=marked('@pytest.mark.kvm(share={"/tmp": "mnt/x"})')),
    Case("marker-share-not-a-dict", (IMAGE,),
         ("(@pytest.mark.kvm share=): '/tmp:/mnt' is not a dict of host folder -> guest path",),
         test=marked('@pytest.mark.kvm(share="/tmp:/mnt")')),
    Case("module-marker-network", (IMAGE,),
         ("test_guest (@pytest.mark.kvm network=): 'bridge' is not a network spec",),
         test='import pytest\npytestmark = pytest.mark.kvm(network="bridge")\n' + GUEST_TEST),
    # -- images
    Case("image-missing-spaces-quotes", (f"--kvm-image={MISSING_IMAGE}",),
         (f"command line --kvm-image: image {MISSING_IMAGE!r} does not exist",)),
    Case("image-directory", ("--kvm-image={dir}/adir.qcow2",),
         ("command line --kvm-image: image '{dir}/adir.qcow2' is not a regular file",)),
    Case("image-random-raw", ("--kvm-image={dir}/random.img",),
         ("image '{dir}/random.img' is not a disk image: no qcow2 header and no partition",)),
    Case("image-random-qcow2", ("--kvm-image={dir}/random.qcow2",),
         ("image '{dir}/random.qcow2' is not a disk image",)),
    Case("image-unknown-catalog", ("--kvm-image=debian-99",),
         ("command line --kvm-image: image 'debian-99': unknown catalog image; "
          "known: debian-11, debian-12",)),
    Case("image-catalog-bad-name", ("--kvm-image=Debian 12",),
         ("command line --kvm-image: image 'Debian 12': not a path, URL or catalog name",)),
    Case("image-empty", ("--kvm-image=",),
         ("command line --kvm-image: '' is not an image path, URL or name",)),
    Case("image-ftp-url", ("--kvm-image=ftp://example.invalid/x.qcow2",),
         ("image 'ftp://example.invalid/x.qcow2': URL scheme 'ftp' is not supported",)),
    Case("image-url-bad-sha256", ("--kvm-image=https://example.invalid/x.qcow2#sha256=zz",),
         ("image 'https://example.invalid/x.qcow2#sha256=zz': the URL fragment must be "
          "sha256=HEX (64 hex digits)",)),
    Case("image-path-with-sha256", ("--kvm-image=ok.qcow2#sha256=abc",),
         ("image 'ok.qcow2#sha256=abc': not a path, URL or catalog name",)),
    # -- libvirt URIs
    Case("uri-nonsense", ("--kvm-backend=libvirt", "--kvm-uri=nonsense", IMAGE),
         ("command line --kvm-uri: 'nonsense' is not a libvirt URI",)),
    Case("uri-spaces", ("--kvm-backend=libvirt", "--kvm-uri=qemu:///system extra", IMAGE),
         ("command line --kvm-uri: 'qemu:///system extra' is not a libvirt URI",)),
    Case("uri-remote-tcp", ("--kvm-backend=libvirt", "--kvm-uri=qemu+tcp://host/system", IMAGE),
         ("--kvm-uri qemu+tcp://host/system:", "use qemu+ssh://USER@HOST/system")),
    # -- image secrets
    Case("secret-missing", (f"--kvm-image-secret={MISSING_SECRET}",),
         (f"command line --kvm-image-secret: secret file {MISSING_SECRET!r}: No such file",)),
    Case("secret-readable-by-others", ("--kvm-image-secret={dir}/open-key",),
         ("secret file '{dir}/open-key' is readable by others (mode 644); chmod 600 it",)),
    Case("secret-empty", ("--kvm-image-secret={dir}/empty-key",),
         ("secret file '{dir}/empty-key' is empty",)),
    Case("secret-directory", ("--kvm-image-secret={dir}/adir.qcow2",),
         ("secret file '{dir}/adir.qcow2' is not a regular file",)),
]  # fmt: skip


def _qemu_children() -> list[int]:
    """QEMU processes whose parent is this process (inner runs are in-process)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        if comm.startswith("qemu") and ppid == os.getpid():
            found.append(int(entry.name))
    return found


@pytest.fixture
def sandbox(pytester: pytest.Pytester, tmp_path: Path, monkeypatch) -> Path:
    """Files the cases refer to, and a private runtime dir to count leftovers in."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(pytester.path / "ok.qcow2"),
                    "16M"], check=True)  # fmt: skip
    (pytester.path / "adir.qcow2").mkdir()
    (pytester.path / "random.img").write_bytes(os.urandom(2 * 1024 * 1024))
    (pytester.path / "random.qcow2").write_bytes(os.urandom(100))
    open_key = pytester.path / "open-key"
    open_key.write_text("s3cret")
    open_key.chmod(0o644)
    empty = pytester.path / "empty-key"
    empty.write_text("")
    empty.chmod(0o600)
    runtime = tmp_path / "rt"
    runtime.mkdir()
    monkeypatch.setenv("PYTEST_KVM_RUNTIME_DIR", str(runtime))
    for name in list(os.environ):
        if name.startswith("PYTEST_KVM_") and name != "PYTEST_KVM_RUNTIME_DIR":
            monkeypatch.delenv(name)
    return runtime


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clear_usage_error(
    pytester: pytest.Pytester, sandbox: Path, monkeypatch, case: Case
):
    here = str(pytester.path)
    for name, value in case.env.items():
        monkeypatch.setenv(name, value)
    if case.ini:
        pytester.makeini(f"[pytest]\n{case.ini}\n")
    pytester.makepyfile(case.test.replace("{dir}", here))
    result = pytester.runpytest(*(a.replace("{dir}", here) for a in case.args))
    out, err = result.stdout.str(), result.stderr.str()
    assert result.ret == pytest.ExitCode.USAGE_ERROR, out + err
    for needle in case.needles:
        assert needle.replace("{dir}", here) in err, err
    # One line, ours, and no traceback through pytest-kvm's code.
    ours = [line for line in err.splitlines() if "pytest-kvm:" in line]
    assert len(ours) == 1 and ours[0].startswith("ERROR: pytest-kvm: "), err
    assert "Traceback" not in out + err
    assert "pytest_kvm/" not in out + err
    # Nothing left behind: no run directory, no QEMU.
    assert list(sandbox.iterdir()) == []
    assert _qemu_children() == []


def test_the_table_is_big_enough():
    assert len(CASES) >= 25
    assert len({c.id for c in CASES}) == len(CASES)
