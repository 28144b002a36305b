"""A libvirtd for the libvirt backend's tests, private to them.

``Libvirtd.start`` always starts its own virtlogd and libvirtd, whatever runs on the
host: in a network namespace of its own (loopback only) and a mount namespace where
libvirt's directories are private to it: /etc/libvirt (a copy), /run/libvirt,
/var/lib/libvirt (its directory layout, without the host's state) and
/var/log/libvirt are directories under the test's workdir; the pool directory
/var/lib/libvirt/images (uploads persist across runs) and the capabilities cache
/var/cache/libvirt are the host's. Its socket is
``WORKDIR/run/libvirt-sock``, reached with ``qemu:///system?socket=...`` (``uri``);
the system socket /run/libvirt/libvirt-sock, and a host libvirtd on it, are never
touched. Guests' QEMUs live in the namespace: their user-network forwards listen on
its 127.0.0.1, so inner test runs go there with ``ip netns exec`` (``wrap``).

The two daemons run under a small supervisor (``python libvirtd.py --serve WORKDIR``,
started by ``ip netns exec`` + ``unshare --mount``) that makes the mounts, starts them
as its children, and on SIGTERM ends them by PID. ``close`` stops the daemon's
networks, ends the supervisor by its PID and deletes the namespace.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

SYSTEM_SOCKET = Path("/run/libvirt/libvirt-sock")
LIBVIRTD = Path("/usr/sbin/libvirtd")
VIRTLOGD = Path("/usr/sbin/virtlogd")
# Host path -> the daemon's private copy under WORKDIR: "config" copied whole,
# "layout" its directories only (owners and modes kept), "empty" nothing.
PRIVATE = (
    (Path("/etc/libvirt"), "etc", "config"),
    (Path("/run/libvirt"), "run", "empty"),
    (Path("/var/lib/libvirt"), "lib", "layout"),
    (Path("/var/log/libvirt"), "log", "layout"),
)  # /var/cache/libvirt stays shared: QEMU's capabilities, probed once per binary
SHARED_POOL_DIR = Path("/var/lib/libvirt/images")


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


def _copy_layout(src: Path, dest: Path) -> None:
    """``src``'s directory tree without its files, owners and modes kept (QEMU runs as
    libvirt-qemu and needs the same access as under the host's directories)."""
    for root, dirs, _files in os.walk(src):
        rel = Path(root).relative_to(src)
        if rel == Path("images"):
            dirs.clear()
        for path in (dest / rel, *(dest / rel / d for d in dirs)):
            origin = src / path.relative_to(dest)
            st = origin.stat()
            path.mkdir(exist_ok=True)
            os.chown(path, st.st_uid, st.st_gid)
            path.chmod(st.st_mode & 0o7777)


def _prepare(workdir: Path) -> None:
    """The daemon's private directories under ``workdir`` (in the host's view)."""
    for host, name, kind in PRIVATE:
        dest = workdir / name
        if kind == "config":
            shutil.copytree(host, dest, symlinks=True)
        elif kind == "layout" and host.is_dir():
            _copy_layout(host, dest)
        else:
            dest.mkdir(mode=0o755)
    SHARED_POOL_DIR.mkdir(parents=True, exist_ok=True)
    (workdir / "lib" / "images").mkdir(exist_ok=True)
    (workdir / "libvirtd.conf").write_text(
        # Root only: the socket's directory is private too.
        'unix_sock_rw_perms = "0700"\nunix_sock_ro_perms = "0700"\n'
        'auth_unix_rw = "none"\nauth_unix_ro = "none"\n'
        f'unix_sock_dir = "{workdir / "run"}"\n'
    )


def _mount_private(workdir: Path) -> None:
    """In this process's own mount namespace: libvirt's directories become the
    private ones (the host's pool directory stays shared)."""
    subprocess.run(["mount", "--make-rprivate", "/"], check=True)
    subprocess.run(["mount", "--bind", str(SHARED_POOL_DIR), str(workdir / "lib" / "images")],
                   check=True)  # fmt: skip
    for host, name, _kind in PRIVATE:
        host.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "--rbind", str(workdir / name), str(host)], check=True)


def serve(workdir: Path) -> None:
    """The supervisor (run inside the namespaces): mounts, virtlogd, libvirtd; on
    SIGTERM both end (libvirtd first), by PID, and so does this."""
    _mount_private(workdir)
    procs: list[subprocess.Popen[bytes]] = []
    stopping = False

    def stop(_sig: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    run = workdir / "run"
    argvs = (
        ([str(VIRTLOGD), "-p", str(run / "virtlogd.pid")], run / "virtlogd-sock"),
        ([str(LIBVIRTD), "-f", str(workdir / "libvirtd.conf"), "-p", str(run / "libvirtd.pid")],
         run / "libvirt-sock"),
    )  # fmt: skip
    try:
        for argv, sock in argvs:
            log = (workdir / f"{Path(argv[0]).name}.log").open("wb")
            procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT))  # fmt: skip
            log.close()
            deadline = time.monotonic() + 60
            while not answers(sock) and not stopping:
                if procs[-1].poll() is not None or time.monotonic() > deadline:
                    return
                time.sleep(0.1)
        while not stopping and all(p.poll() is None for p in procs):
            time.sleep(0.2)
    finally:
        for proc in reversed(procs):
            _end(proc)


def _end(proc: subprocess.Popen[bytes], wait: float = 20) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


class Libvirtd:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.netns: str | None = None
        self.procs: list[subprocess.Popen[bytes]] = []
        self.started = False

    @property
    def socket(self) -> Path:
        return self.workdir / "run" / "libvirt-sock"

    @property
    def uri(self) -> str:
        """This daemon, locally."""
        return f"qemu:///system?socket={self.socket}"

    @property
    def remote_uri(self) -> str:
        """This daemon through the test's sshd (``Sshd``) in its namespace, whose
        processes see it at the system socket's path (a ``socket=`` would make
        libvirt's ssh transport run ``nc`` there instead of virt-ssh-helper)."""
        return "qemu+ssh://root@127.0.0.1/system"

    def wrap(self, argv: list[str]) -> list[str]:
        """``argv`` run where the daemon's guests are reachable."""
        if self.netns is None:
            return argv
        return ["ip", "netns", "exec", self.netns, *argv]

    def as_system(self, argv: list[str]) -> list[str]:
        """``argv`` run in the namespace, seeing this daemon's socket at the system
        path /run/libvirt/libvirt-sock (in a mount namespace of its own; it execs)."""
        return self.wrap(["unshare", "--mount", "--propagation", "private", "--",
                          sys.executable, __file__, "--as-system", str(self.workdir), "--",
                          *argv])  # fmt: skip

    def virsh(self, *args: str) -> str:
        return virsh(*args, uri=self.uri)

    def start(self) -> Libvirtd:
        try:
            self.netns = f"pkvm-lv-{os.getpid()}-{secrets.token_hex(2)}"
            subprocess.run(["ip", "netns", "add", self.netns], check=True, capture_output=True)
            subprocess.run(["ip", "-n", self.netns, "link", "set", "lo", "up"], check=True)
            self.workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
            _prepare(self.workdir)
            log = (self.workdir / "supervisor.log").open("wb")
            proc = subprocess.Popen(
                self.wrap(["unshare", "--mount", "--propagation", "private", "--",
                           sys.executable, __file__, "--serve", str(self.workdir)]),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
            log.close()
            self.procs.append(proc)
            deadline = time.monotonic() + 90
            while not answers(self.socket):
                if proc.poll() is not None or time.monotonic() > deadline:
                    logs = [self.workdir / n for n in ("supervisor.log", "virtlogd.log",
                                                       "libvirtd.log")]  # fmt: skip
                    text = "\n".join(p.read_text(errors="replace") for p in logs if p.exists())
                    raise RuntimeError(f"libvirtd did not start: {text[-3000:]}")
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
                for name in self.virsh("net-list", "--name").split():
                    self.virsh("net-destroy", name)
        for proc in reversed(self.procs):
            _end(proc, 45)  # the supervisor: it ends its daemons (20 s each at most)
        self.procs.clear()
        if self.netns is not None:
            with contextlib.suppress(subprocess.CalledProcessError):
                subprocess.run(["ip", "netns", "del", self.netns], check=True, capture_output=True)
            self.netns = None

    def __enter__(self) -> Libvirtd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def virsh(*args: str, uri: str) -> str:
    return subprocess.run(
        ["virsh", "-q", "-c", uri, *args], check=True, capture_output=True, text=True
    ).stdout


def have_virsh() -> bool:
    return shutil.which("virsh") is not None


class Sshd:
    """An sshd on 127.0.0.1:22 inside ``daemon``'s namespace: the "remote" libvirt
    host of the tests (``daemon.remote_uri``).

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
        # sshd, and so libvirt's virt-ssh-helper it runs, see the daemon's socket at
        # the system path, as on a real remote host.
        self.proc = subprocess.Popen(
            self.daemon.as_system(["/usr/sbin/sshd", "-D", "-e", "-f", str(config)]),
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


def as_system(workdir: Path, argv: list[str]) -> None:
    """(In a mount namespace of its own) bind the daemon's run directory on
    /run/libvirt and exec ``argv``."""
    subprocess.run(["mount", "--make-rprivate", "/"], check=True)
    subprocess.run(["mount", "--bind", str(workdir / "run"), "/run/libvirt"], check=True)
    os.execv(argv[0], argv)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"] and len(sys.argv) == 3:
        serve(Path(sys.argv[2]))
    elif sys.argv[1:2] == ["--as-system"] and sys.argv[3:4] == ["--"] and sys.argv[4:]:
        as_system(Path(sys.argv[2]), sys.argv[4:])
    else:
        raise SystemExit("usage: libvirtd.py --serve WORKDIR | --as-system WORKDIR -- CMD...")
