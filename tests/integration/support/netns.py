"""A network namespace with a bridge and a DHCP server (dnsmasq), for bridge tests.

Everything lives inside the namespace: the bridge ``br0`` (10.77.0.1/24), a veth pair
for bad-input tests (one end a port of br0), and dnsmasq answering DHCP on br0
only (no DNS; without its ping check unless asked: ``ping``). Tests run their inner
pytest there with ``ip netns exec``, so the guests' taps, their traffic and the test's
SSH never touch the host's interfaces.
``close`` ends dnsmasq by its PID and deletes the namespace, which removes the bridge.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

BRIDGE = "br0"
GATEWAY = "10.77.0.1"
DHCP_FIRST, DHCP_LAST = "10.77.0.50", "10.77.0.150"
HERE = Path(__file__).resolve().parent


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


def namespaces() -> set[str]:
    return {line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()}


def lease_for(leases: Path, mac: str) -> str | None:
    """The address dnsmasq's lease table (``leases``) gives ``mac``, if any."""
    for line in leases.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[1].lower() == mac.lower():
            return fields[2]
    return None


class BridgeNetns:
    """``start`` builds it; ``close`` (idempotent) tears it all down."""

    def __init__(self, workdir: Path, netns: str | None = None, ping: bool = False) -> None:
        # In a namespace of its own, or (``netns``) in an existing one, which then
        # outlives it: close removes the bridge and veth pair instead.
        self._existing = netns is not None
        self.name = netns or f"pkvm-test-{os.getpid()}-{secrets.token_hex(3)}"
        self.workdir = workdir
        self.leases = workdir / "dnsmasq.leases"
        self.log = workdir / "dnsmasq.log"
        self.dnsmasq: subprocess.Popen[bytes] | None = None
        # dnsmasq pings an address before it offers it, and waits up to 3 s for an
        # answer, one address at a time: 3 s of each bridge clone's 6, 12 of four at
        # once (bench/RESULTS.md). Not what the bridge tests check: off unless asked.
        self.ping = ping
        self._made = False

    def start(self) -> BridgeNetns:
        dnsmasq = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
        if not Path(dnsmasq).exists():
            raise RuntimeError("dnsmasq is not installed (Debian package dnsmasq-base)")
        try:
            if not self._existing:
                ip("netns", "add", self.name)
            self._made = True
            n = ("-n", self.name)
            ip(*n, "link", "set", "lo", "up")
            ip(*n, "link", "add", BRIDGE, "type", "bridge")
            ip(*n, "address", "add", f"{GATEWAY}/24", "dev", BRIDGE)
            ip(*n, "link", "set", BRIDGE, "up")
            # For bad-input tests: veth0 is a port of br0, veth1 no bridge at all.
            ip(*n, "link", "add", "veth0", "type", "veth", "peer", "name", "veth1")
            ip(*n, "link", "set", "veth0", "master", BRIDGE)
            self.leases.touch()
            self.dnsmasq = subprocess.Popen(
                [
                    "ip", "netns", "exec", self.name, dnsmasq,
                    "--keep-in-foreground", "--conf-file=/dev/null", "--port=0",
                    f"--interface={BRIDGE}", "--bind-interfaces", "--except-interface=lo",
                    f"--dhcp-range={DHCP_FIRST},{DHCP_LAST},255.255.255.0,1h",
                    "--dhcp-authoritative", f"--dhcp-leasefile={self.leases}",
                    "--user=root", "--group=root", "--log-dhcp",
                    f"--log-facility={self.log}", "--pid-file=",
                    *(() if self.ping else ("--no-ping",)),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )  # fmt: skip
            with contextlib.suppress(subprocess.TimeoutExpired):
                _, err = self.dnsmasq.communicate(timeout=0.5)
                raise RuntimeError(f"dnsmasq exited at once: {err.decode(errors='replace')}")
        except BaseException:
            self.close()
            raise
        return self

    def exec_argv(self, *argv: str) -> list[str]:
        """``argv`` run inside the namespace (and its own mount namespace)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def with_bridge_acl(self, acl: str, *argv: str) -> list[str]:
        """``argv`` inside the namespace, seeing ``acl`` as /etc/qemu/bridge.conf
        (an overlay on /etc in a private mount namespace; the host's /etc is untouched)."""
        helper = str(HERE / "in_overlay_etc.py")
        work = str(self.workdir / "etc-overlay")
        return self.exec_argv(sys.executable, helper, work, acl, "--", *argv)

    def lease_for(self, mac: str) -> str | None:
        return lease_for(self.leases, mac)

    def links(self, kind: str = "") -> list[str]:
        args = ["-n", self.name, "-o", "link", "show"] + (["type", kind] if kind else [])
        return [line.split(":")[1].strip() for line in ip(*args).splitlines() if line]

    def ports(self) -> list[str]:
        """Interfaces enslaved to the bridge."""
        out = ip("-n", self.name, "-o", "link", "show", "master", BRIDGE)
        return sorted(line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if line)

    def close(self) -> None:
        proc, self.dnsmasq = self.dnsmasq, None
        if proc is not None and proc.poll() is None:
            proc.terminate()  # ip netns exec exec()s dnsmasq: this PID is dnsmasq's
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._made:
            self._made = False
            if self._existing:
                for link in (BRIDGE, "veth0"):
                    subprocess.run(["ip", "-n", self.name, "link", "del", link], check=False)
            else:
                subprocess.run(["ip", "netns", "delete", self.name], check=False)

    def __enter__(self) -> BridgeNetns:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
