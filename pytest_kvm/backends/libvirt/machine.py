"""LibvirtMachine: one transient libvirt domain, local or remote.

Everything goes through the libvirt API, so a local ``qemu:///system`` and a remote
``qemu+ssh://host/system`` take the same path:

- The guest's base image is uploaded once per host into a storage pool (a volume
  named by the image's checksum, completed by a marker volume), and the guest's
  overlay (created locally, tiny) is uploaded next to it, rebased onto that volume.
- The domain is created with ``createXML`` paused and auto-destroyed when our
  connection closes (also when this process dies), its console is opened as a
  libvirt stream and copied into the guest's local serial log, then it runs.
- QMP commands go through ``qemuMonitorCommand`` and guest-agent commands through
  ``qemuAgentCommand``; SSH is forwarded to 127.0.0.1 on the hypervisor's host
  with the user network's ``hostfwd_add``.

Lifecycle like the qemu backend's: the constructor records, ``start()`` acts,
``close()`` is idempotent and removes the domain and the guest's volumes.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...console import tail
from ...errors import GuestLaunchError, KvmConfigError
from ...images.overlay import image_info, qemu_img
from ...qga import GuestAgentError
from ..base import Machine, MachineSpec, QmpError
from .agent import LibvirtAgent
from .connection import (
    DESTROY_WAIT,
    call_within,
    connect,
    first_line,
    forget_connection,
    load_libvirt,
    open_connection,
)
from .console import ConsolePump, open_console
from .domain import (
    METADATA_NS,
    REFUSALS,
    USER_NETDEV,
    LibvirtTarget,
    domain_xml,
    host_domain_type,
)
from .saveimage import (
    SaveImageError,
    clone_xml,
    read_header,
    rewritten,
    saved_macs,
    slirp_mac_offsets,
)
from .storage import (
    clone_state,
    lookup,
    reap_orphan_volumes,
    refresh_pool,
    send_file,
    storage_pool,
    upload_image,
    upload_state,
    volume_name,
    volume_xml,
)


class LibvirtMachine(Machine):
    """One transient libvirt domain."""

    keep_refusal = (
        "libvirt destroys the guests of a connection that closes (AUTODESTROY); "
        "use --kvm-backend qemu to keep one"
    )
    events_note = (
        "no QMP events: on the libvirt backend libvirtd owns the QMP monitor "
        "(see its log, and the domain XML in qemu-argv.txt)"
    )
    primary_netdev = USER_NETDEV
    disk_is_remote = True
    forwards_ssh_after_start = True
    has_vga = False  # a domain without display=True has no graphics card

    def __init__(self, spec: MachineSpec, target: LibvirtTarget, accel: str) -> None:
        if any(drive.secret is not None for drive in spec.drives):
            raise KvmConfigError(REFUSALS["encrypted images"])
        if spec.nics or spec.tap_fd is not None:
            raise KvmConfigError(REFUSALS["vlans and bridges"])
        self.spec = spec
        self.target = target
        self._accel = accel
        self.domain_type = "kvm" if accel == "kvm" else "qemu"
        self.domain_name = f"pytest-kvm-{spec.name}"
        self._conn: Any = None
        self._domain: Any = None
        self._pool: Any = None
        self._volumes: list[Any] = []
        self._local_backing: Path | None = None  # what the uploaded overlay is on, here
        self._pump: ConsolePump | None = None
        self._xml = ""
        self._closed = False
        self._exit: int | None = None
        self._stuck = False  # a call on self._conn did not return: it is not used again
        self.lost = ""  # why the connection died (keepalive), when it did
        self.peak_rss_kib = 0
        self._sampler: threading.Thread | None = None
        self._sampling = threading.Event()

    # -- start ----------------------------------------------------------------------

    @property
    def argv(self) -> list[str]:
        """The domain XML stands in for a command line here (it goes into failure
        artifacts: the VNC password is blanked, as ``virsh dumpxml`` does)."""
        xml = re.sub(r'\spasswd="[^"]*"', ' passwd="(hidden)"', self._xml)
        return [f"libvirt {self.target.uri} domain {self.domain_name}", xml]

    @property
    def events(self) -> list[dict[str, Any]]:
        return []

    def start(self) -> None:
        if self._conn is not None:
            raise RuntimeError("machine already started")
        libvirt, _ = load_libvirt()
        spec = self.spec
        try:
            self._conn = connect(self.target.uri)
            self._pool = storage_pool(self._conn, self.target.uri, self.target.pool)
            reap_orphan_volumes(self._pool)
            decided = host_domain_type(self._conn, self.target.uri, self.target.accel)
            self.domain_type = decided or self.domain_type
            disks = self._upload_disks()
            if spec.incoming is not None:
                self._restore(spec.incoming, disks)
            else:
                self._xml = domain_xml(spec, self.domain_name, self.domain_type, disks,
                                       self.target.labels)  # fmt: skip
                flags = libvirt.VIR_DOMAIN_START_AUTODESTROY | libvirt.VIR_DOMAIN_START_PAUSED
                self._domain = self._conn.createXML(self._xml, flags)
            self._open_console()
            self._domain.resume()
            self._sampling.clear()
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        except KvmConfigError:
            self.close()
            raise
        except BaseException as exc:
            self.close()
            if isinstance(exc, KeyboardInterrupt):
                raise
            detail = first_line(exc) if isinstance(exc, libvirt.libvirtError) else str(exc)
            raise GuestLaunchError(
                f"guest {spec.name!r}: libvirt ({self.target.uri}) could not start domain "
                f"{self.domain_name}: {detail}",
                argv=self.argv,
                console_tail=tail(spec.serial_log, 20),
            ) from None

    def _restore(self, saved: Path, disks: list[tuple[str, str, str, str]]) -> None:
        """The domain restored, paused, from a copy of the template's save image whose
        XML names this guest (see saveimage.py). A restored domain has no AUTODESTROY:
        the guest's lease names it, and the reaper destroys it after a crash."""
        libvirt, _ = load_libvirt()
        header = read_header(saved)
        old = saved_macs(header.xml)[:1]
        mac = self.spec.mac.lower()
        patches: list[tuple[int, bytes]] = []
        if old and old[0] != mac:
            # The clone's own MAC, as on the qemu backend: in its XML (QEMU's command
            # line, what the NIC resets to) and in slirp's saved DHCP table; the NIC's
            # saved state keeps the template's until the guest changes it (identity.py).
            offsets = slirp_mac_offsets(saved, old[0], start=header.size)
            if not offsets:
                raise GuestLaunchError(
                    f"the template's save image {saved} holds no DHCP lease of its MAC "
                    f"{old[0]} (not user networking?): cannot give the clone its own"
                )
            raw = bytes(int(part, 16) for part in mac.split(":"))
            patches = [(offset, raw) for offset in offsets]
        vnc = (self.spec.workdir / "vnc-password").read_text().strip() if self.spec.vnc else None
        try:
            self._xml = clone_xml(header.xml, self.domain_name, [(p, v) for p, v, _, _ in disks],
                                  self.target.labels, METADATA_NS, vnc, mac,
                                  self.spec.shares)  # fmt: skip
        except SaveImageError as exc:
            raise GuestLaunchError(f"restoring {saved}: {exc}") from None
        state = upload_state(self._conn, self._pool, saved, self.target.lock_dir)
        name = volume_name(self.domain_name, 9, "save")
        stale = lookup(self._pool, name)
        if stale is not None:
            stale.delete(0)
        head = rewritten(header, self._xml)
        copy = clone_state(self._conn, self._pool, state, name, [(0, head), *patches])
        try:
            self._conn.restoreFlags(copy.path(), None, libvirt.VIR_DOMAIN_SAVE_PAUSED)
        finally:
            with contextlib.suppress(libvirt.libvirtError):
                copy.delete(0)  # QEMU has read all of it
        self._domain = self._conn.lookupByName(self.domain_name)

    def save_state(self, path: Path, timeout: float = 120.0) -> None:
        """Save the running domain with ``virDomainSave`` (RAM and devices in one
        file; the domain stops), into the pool where it runs, then bring the file to
        ``path`` and the guest's disk, as it was saved, to its local overlay."""
        libvirt, _ = load_libvirt()
        if self._domain is None or self._pool is None:
            raise GuestLaunchError("the domain is not running")
        name = volume_name(self.domain_name, 8, "save")
        target = ET.fromstring(self._pool.XMLDesc(0)).findtext("target/path")  # noqa: S314
        remote = f"{target}/{name}"
        try:
            self._domain.save(remote)
        except libvirt.libvirtError as exc:
            raise GuestLaunchError(f"libvirt could not save {self.domain_name}: "
                                   f"{first_line(exc)}") from None  # fmt: skip
        self._exit = 0
        refresh_pool(self._pool)
        vol = self._pool.storageVolLookupByName(name)
        self._volumes.append(vol)
        self._download(vol, path)
        self.download_overlay(self.spec.drives[0].path, self._local_backing)

    def _download(
        self, vol: Any, dest: Path, prepare: Callable[[Path], None] | None = None
    ) -> None:
        """Volume ``vol`` into ``dest``, whole or not at all; ``prepare`` is given the
        downloaded file before it takes ``dest``'s name."""
        stream = self._conn.newStream(0)
        vol.download(stream, 0, 0, 0)
        tmp = dest.with_name(dest.name + ".download")
        try:
            with tmp.open("wb") as out:
                stream.recvAll(lambda _s, data, _o: _o.write(data), out)
            stream.finish()
            if prepare is not None:
                prepare(tmp)
            tmp.replace(dest)
        finally:
            tmp.unlink(missing_ok=True)

    def _open_console(self) -> None:
        conn, stream = open_console(self.target.uri, self._domain)
        self._pump = ConsolePump(conn, stream, self.spec.serial_log, self.spec.console_socket)

    def _upload_disks(self) -> list[tuple[str, str, str, str]]:
        """Each drive as a volume of the pool: the overlay rebased onto the uploaded
        image, read-only drives (the seed) copied as they are."""
        pool_name = self.target.pool
        disks: list[tuple[str, str, str, str]] = []
        for index, drive in enumerate(self.spec.drives):
            name = volume_name(self.domain_name, index, drive.format)
            stale = lookup(self._pool, name)
            if stale is not None:
                stale.delete(0)
            if index == 0 and drive.media == "disk":
                info = image_info(drive.path)
                backing = info.get("full-backing-filename") or info.get("backing-filename")
                if not backing:  # an installer's blank disk: uploaded as it is
                    vol = self._pool.createXML(
                        volume_xml(name, drive.path.stat().st_size, "qcow2"), 0
                    )
                    self._volumes.append(vol)
                    send_file(self._conn, vol, drive.path)
                    disks.append((pool_name, name, "qcow2", "disk"))
                    continue
                self._local_backing = Path(backing)
                base = upload_image(self._conn, self._pool, Path(backing), self.target.lock_dir)
                upload = drive.path.with_name(drive.path.name + ".libvirt")
                shutil.copyfile(drive.path, upload)
                try:
                    proc = qemu_img("rebase", "-u", "-F", "qcow2", "-b", base.path(), "--",
                                    str(upload))  # fmt: skip
                    if proc.returncode != 0:
                        raise GuestLaunchError(f"cannot rebase the overlay: {proc.stderr.strip()}")
                    vol = self._pool.createXML(
                        volume_xml(name, upload.stat().st_size, "qcow2", base.path()), 0
                    )
                    self._volumes.append(vol)
                    send_file(self._conn, vol, upload)
                finally:
                    upload.unlink(missing_ok=True)
                disks.append((pool_name, name, "qcow2", "disk"))
                continue
            vol = self._pool.createXML(volume_xml(name, drive.path.stat().st_size, drive.format), 0)
            self._volumes.append(vol)
            send_file(self._conn, vol, drive.path)
            device = "cdrom" if drive.media == "cdrom" or drive.readonly else "disk"
            disks.append((pool_name, name, drive.format, device))
        return disks

    # -- running --------------------------------------------------------------------

    def _sample(self) -> None:
        while not self._sampling.wait(1.0):
            stats = self.stats()
            if not stats:
                return

    def stats(self) -> dict[str, int]:
        """CPU time (ns), resident memory now and at its peak so far (KiB), bytes
        written to disks, from libvirt's domain statistics; {} once it is gone."""
        libvirt, _ = load_libvirt()
        domain = self._domain
        if domain is None:
            return {}
        flags = (
            libvirt.VIR_DOMAIN_STATS_CPU_TOTAL
            | libvirt.VIR_DOMAIN_STATS_BALLOON
            | libvirt.VIR_DOMAIN_STATS_BLOCK
        )
        try:
            [(_, raw)] = self._conn.domainListGetStats([domain], flags)
        except (libvirt.libvirtError, ValueError):
            return {}
        rss = int(raw.get("balloon.rss", 0))
        self.peak_rss_kib = max(self.peak_rss_kib, rss)
        written = sum(
            int(raw.get(f"block.{i}.wr.bytes", 0)) for i in range(int(raw.get("block.count", 0)))
        )
        return {
            "cpu_time_ns": int(raw.get("cpu.time", 0)),
            "rss_kib": rss,
            "peak_rss_kib": self.peak_rss_kib,
            "disk_written_bytes": written,
        }

    def is_running(self) -> bool:
        libvirt, _ = load_libvirt()
        if self._domain is None or self._exit is not None:
            return False
        try:
            running = bool(self._domain.isActive())
        except libvirt.libvirtError as exc:
            running = False
            if not self._conn.isAlive():  # the link, not the guest, is gone
                self.lost = f"libvirt connection to {self.target.uri} lost: {first_line(exc)}"
        if not running:
            self._exit = 0
        return running

    def exit_code(self) -> int | None:
        return None if self.is_running() else self._exit

    def qmp(self, command: str, **args: Any) -> Any:
        libvirt, libvirt_qemu = load_libvirt()
        if not self.is_running():
            why = f" ({self.lost})" if self.lost else ""
            raise ConnectionError(f"guest {self.spec.name!r} is not running{why}")
        message: dict[str, Any] = {"execute": command}
        if args:
            message["arguments"] = args
        try:
            reply = json.loads(
                libvirt_qemu.qemuMonitorCommand(self._domain, json.dumps(message), 0)
            )
        except libvirt.libvirtError as exc:
            raise ConnectionError(f"guest {self.spec.name!r}: {first_line(exc)}") from None
        if "error" in reply:
            error = reply["error"]
            raise QmpError(command, str(error.get("class", "")), str(error.get("desc", error)))
        return reply.get("return")

    def leased_address(self, mac: str) -> str:
        """The IPv4 address a libvirt network's DHCP server leased to ``mac``, or ""."""
        libvirt, _ = load_libvirt()
        if self._domain is None or self.spec.network.kind != "libvirt":
            return ""
        try:
            found = self._domain.interfaceAddresses(
                libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE, 0
            )
        except libvirt.libvirtError:
            return ""
        for info in (found or {}).values():
            if str(info.get("hwaddr", "")).lower() != mac.lower():
                continue
            for addr in info.get("addrs") or []:
                if addr.get("type") == libvirt.VIR_IP_ADDR_TYPE_IPV4:
                    return str(addr["addr"])
        return ""

    def agent(self) -> LibvirtAgent:
        if self._domain is None:
            raise GuestAgentError("the domain is not running")
        return LibvirtAgent(self._domain)

    def wait_for_exit(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.is_running():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def shutdown(self, timeout: float = 30.0) -> None:
        """ACPI power-off, then destroy."""
        libvirt, _ = load_libvirt()
        if not self.is_running():
            return
        with contextlib.suppress(libvirt.libvirtError):
            self._domain.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
            if self.wait_for_exit(timeout):
                return
        self.kill()

    def kill(self) -> None:
        """Destroy the domain. A destroy that does not return within DESTROY_WAIT (a
        stuck libvirt client connection or daemon) is done again on a new connection,
        and this one is dropped."""
        if self._domain is None or self._stuck or not self.is_running():
            return
        if not call_within(DESTROY_WAIT, self._domain.destroy):
            self._stuck = True
            forget_connection(self.target.uri, self._conn)
            self._cleanup_afresh()
        self._exit = -9

    def _cleanup_afresh(self) -> None:
        """Destroy the domain and delete its volumes over a connection of their own."""
        libvirt, _ = load_libvirt()
        names = [vol.name() for vol in self._volumes]
        self._volumes.clear()

        def cleanup() -> None:
            conn = open_connection(self.target.uri)
            try:
                with contextlib.suppress(libvirt.libvirtError):
                    conn.lookupByName(self.domain_name).destroy()
                pool = conn.storagePoolLookupByName(self.target.pool)
                for name in names:
                    with contextlib.suppress(libvirt.libvirtError):
                        pool.storageVolLookupByName(name).delete(0)
            finally:
                conn.close()

        if call_within(DESTROY_WAIT, cleanup):
            message = (f"libvirt did not answer destroy of {self.domain_name} within "
                       f"{DESTROY_WAIT:.0f} s; destroyed it over a new connection")  # fmt: skip
        else:
            message = (f"libvirt ({self.target.uri}) did not destroy {self.domain_name} within "
                       f"{2 * DESTROY_WAIT:.0f} s; remove it with `virsh -c {self.target.uri} "
                       f"destroy {self.domain_name}`")  # fmt: skip
        print(f"pytest-kvm: {message}", file=sys.stderr)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._sampling.set()
        try:
            self.kill()
        finally:
            if self._pump is not None:
                self._pump.close()
            if self._sampler is not None:
                self._sampler.join(5)
            for vol in self._volumes:
                with contextlib.suppress(Exception):
                    vol.delete(0)
            self._volumes.clear()

    def screenshot(self) -> bytes:
        """The display as the image libvirt sends (PPM from QEMU)."""
        libvirt, _ = load_libvirt()
        if self._domain is None:
            raise GuestLaunchError("the domain is not running")
        stream = self._conn.newStream(0)
        chunks: list[bytes] = []
        try:
            self._domain.screenshot(stream, 0, 0)
            stream.recvAll(lambda _s, data, out: out.append(data), chunks)
            stream.finish()
        except libvirt.libvirtError as exc:
            with contextlib.suppress(libvirt.libvirtError):
                stream.abort()
            raise GuestLaunchError(f"screenshot: {first_line(exc)}") from None
        return b"".join(chunks)

    def lease_fields(self) -> dict[str, object]:
        return {"domain": self.domain_name}

    def prepare_vnc(self, password: str) -> None:
        """The password is in the domain XML already."""

    def fetch_disk(self, dest: Path, backing: Path | None) -> None:
        # A clone's overlay is on its template's disk, not on the image.
        self.download_overlay(dest, self._local_backing if backing is not None else None)

    def download_overlay(self, dest: Path, backing: Path | None) -> None:
        """Copy the guest's overlay volume back to ``dest``, rebased onto the local
        ``backing`` image (None: a disk of its own), for libguestfs and saving."""
        if not self._volumes:
            raise GuestLaunchError("the guest has no overlay volume")

        def rebase(tmp: Path) -> None:
            if backing is None:
                return
            proc = subprocess.run(
                ["qemu-img", "rebase", "-u", "-F", "qcow2", "-b", str(backing), "--", str(tmp)],
                capture_output=True, text=True, check=False, timeout=300,
            )  # fmt: skip
            if proc.returncode != 0:
                raise GuestLaunchError(f"cannot rebase the downloaded overlay: {proc.stderr}")

        self._download(self._volumes[0], dest, rebase)
