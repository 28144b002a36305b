"""A libvirtd for the libvirt backend's tests, in a network namespace of its own.

When no libvirtd answers on the system socket, ``Libvirtd.start`` creates a network
namespace (loopback only), and starts virtlogd and libvirtd in it in the foreground,
as children of this process. Guests' QEMUs then live in that namespace: their
user-network forwards listen on its 127.0.0.1, so inner test runs go there with
``ip netns exec`` (``wrap``). ``close`` ends both daemons by their PIDs (SIGTERM,
then SIGKILL) and deletes the namespace. A libvirtd that was already running is
used as it is and left alone.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

SYSTEM_SOCKET = Path("/run/libvirt/libvirt-sock")
LIBVIRTD = Path("/usr/sbin/libvirtd")
VIRTLOGD = Path("/usr/sbin/virtlogd")


def answers(path: Path) -> bool:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(2)
        sock.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        sock.close()


def missing() -> str:
    """What is not installed for these tests, or ""."""
    for path, package in ((LIBVIRTD, "libvirt-daemon-system"), (VIRTLOGD, "libvirt-daemon")):
        if not path.exists():
            return f"{path} is not installed (Debian package {package})"
    try:
        import libvirt  # noqa: F401
    except ImportError:
        return "libvirt-python is not installed (pip install libvirt-python)"
    return ""


class Libvirtd:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.netns: str | None = None
        self.procs: list[subprocess.Popen[bytes]] = []
        self.started = False

    def wrap(self, argv: list[str]) -> list[str]:
        """``argv`` run where the daemon's guests are reachable."""
        if self.netns is None:
            return argv
        return ["ip", "netns", "exec", self.netns, *argv]

    def start(self) -> Libvirtd:
        if answers(SYSTEM_SOCKET):
            return self
        try:
            self.netns = f"pkvm-lv-{os.getpid()}-{secrets.token_hex(2)}"
            subprocess.run(["ip", "netns", "add", self.netns], check=True, capture_output=True)
            subprocess.run(["ip", "-n", self.netns, "link", "set", "lo", "up"], check=True)
            Path("/var/log/libvirt").mkdir(parents=True, exist_ok=True)
            for binary, sock in ((VIRTLOGD, "virtlogd-sock"), (LIBVIRTD, "libvirt-sock")):
                log = (self.workdir / f"{binary.name}.log").open("wb")
                proc = subprocess.Popen(
                    self.wrap([str(binary)]),  # foreground: ip netns exec execs it
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )  # fmt: skip
                log.close()
                self.procs.append(proc)
                deadline = time.monotonic() + 60
                while not answers(Path("/run/libvirt") / sock):
                    if proc.poll() is not None or time.monotonic() > deadline:
                        text = (self.workdir / f"{binary.name}.log").read_text(errors="replace")
                        raise RuntimeError(f"{binary} did not start: {text[-2000:]}")
                    time.sleep(0.1)
            self.started = True
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        if self.started:
            # libvirt's network dnsmasqs outlive libvirtd: stop the networks first.
            with contextlib.suppress(subprocess.CalledProcessError, OSError):
                for name in virsh("net-list", "--name").split():
                    virsh("net-destroy", name)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()
        self.procs.clear()
        if self.netns is not None:
            with contextlib.suppress(subprocess.CalledProcessError):
                subprocess.run(["ip", "netns", "del", self.netns], check=True, capture_output=True)
            self.netns = None

    def __enter__(self) -> Libvirtd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def virsh(*args: str) -> str:
    return subprocess.run(
        ["virsh", "-q", "-c", "qemu:///system", *args], check=True, capture_output=True, text=True
    ).stdout


def have_virsh() -> bool:
    return shutil.which("virsh") is not None


class Sshd:
    """An sshd on 127.0.0.1:22 inside ``daemon``'s namespace: the "remote" libvirt
    host of the tests (``qemu+ssh://root@127.0.0.1/system``).

    Its host key and the client key are made here; ``home`` (an overlay's upper
    layer for /root, see in_overlay.py) gets ``.ssh/id_ed25519`` and a
    ``known_hosts`` pinning the host key, so both libvirt's ``ssh`` and paramiko
    find them as a user's own. Ended by PID."""

    def __init__(self, daemon: Libvirtd, workdir: Path) -> None:
        self.daemon = daemon
        self.workdir = workdir
        self.home = workdir / "home" / "upper"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Sshd:
        if self.daemon.netns is None:
            raise RuntimeError("the remote tests need the libvirtd of their own namespace")
        keys = self.workdir / "keys"
        keys.mkdir(mode=0o700, parents=True)
        for name in ("host", "client"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name,
                            "-f", str(keys / name)], check=True)  # fmt: skip
        ssh = self.home / ".ssh"
        ssh.mkdir(mode=0o700, parents=True)
        (self.home).chmod(0o700)
        shutil.copyfile(keys / "client", ssh / "id_ed25519")
        (ssh / "id_ed25519").chmod(0o600)
        host_pub = (keys / "host.pub").read_text().split()[:2]
        (ssh / "known_hosts").write_text(f"127.0.0.1 {' '.join(host_pub)}\n")
        shutil.copyfile(keys / "client.pub", keys / "authorized_keys")
        config = self.workdir / "sshd_config"
        config.write_text(
            "ListenAddress 127.0.0.1\nPort 22\n"
            f"HostKey {keys / 'host'}\nAuthorizedKeysFile {keys / 'authorized_keys'}\n"
            "StrictModes no\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nPidFile none\n"
            "AllowTcpForwarding yes\nLogLevel VERBOSE\n"
        )
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation dir
        log = (self.workdir / "sshd.log").open("wb")
        self.proc = subprocess.Popen(
            self.daemon.wrap(["/usr/sbin/sshd", "-D", "-e", "-f", str(config)]),
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + 30
        while "Server listening" not in (self.workdir / "sshd.log").read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("sshd did not start: " + (self.workdir / "sshd.log").read_text())
            time.sleep(0.1)
        return self

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            self.proc.wait(20)
        self.proc = None

    def __enter__(self) -> Sshd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
