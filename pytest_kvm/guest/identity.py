"""What makes a restored clone a machine of its own rather than a copy of its template:
its MAC (in the saved device state, on QEMU's command line and in the guest), machine-id,
DHCP client identity (DUID from the machine-id, IAID), SSH host key and host name.

Pure logic: the saved state with the MAC replaced, and the one shell script the guest
runs (through qemu-ga, or over SSH without it). ``clone.py`` applies them."""

from __future__ import annotations

import secrets
import shlex
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..errors import GuestError
from ..ssh import KeyPair

HOST_KEY = "/etc/ssh/ssh_host_ed25519_key"
# OpenSSH 9.8 and later (Debian 13): the listener reads its host keys once and
# hands them to this per-connection binary, so a new key needs sshd restarted
# (older sshd re-execs itself per connection and reads the key files then).
SSHD_SESSION = ("/usr/lib/openssh/sshd-session", "/usr/libexec/openssh/sshd-session")
# Restarts the listener where it holds its keys; ``systemctl restart`` returns once
# the new one is ready (Type=notify), and sessions already open stay (KillMode=process).
HOLDS_HOST_KEYS = f"[ -e {SSHD_SESSION[0]} ] || [ -e {SSHD_SESSION[1]} ]"
RELOAD_HOST_KEYS = (
    f"if {HOLDS_HOST_KEYS}; then "
    "systemctl restart ssh.service 2>/dev/null || systemctl restart sshd.service; fi"
)
# Where the guest's NIC config names a MAC (rewritten to the clone's, so that a
# reboot, which comes up with the command line's MAC, still matches them).
_NETWORK_CONFIG = (
    "/etc/systemd/network/*.network /etc/systemd/network/*.link "
    "/etc/netplan/*.yaml /etc/network/interfaces /etc/network/interfaces.d/*"
)
_NETWORKD_FILES = (
    "/etc/systemd/network/*.network /run/systemd/network/*.network "
    "/usr/lib/systemd/network/*.network /lib/systemd/network/*.network"
)
_DROPIN = "50-pytest-kvm-clone.conf"
# journald reads the machine-id once, when it starts: it is ended (SIGTERM, found by
# its name in /proc with shell built-ins) and systemd starts it again at once
# (Restart=always): what ``systemctl restart`` does, without a systemctl process,
# which costs about 0.3 s of a clone's first second under TCG.
RESTART_JOURNALD = (
    "journald=",
    "if [ -d /run/systemd/system ]; then",
    "  for p in /proc/[0-9]*; do",
    '    c=; read -r c <"$p/comm" 2>/dev/null || true',
    '    if [ "$c" = systemd-journal ]; then',
    '      kill -TERM "${p##*/}" 2>/dev/null && journald=1 || true',
    "    fi",
    "  done",
    "fi",
)
#: The line of the script's output that names the journal file the restarted journald
#: makes (``JOURNAL_READY path``): the clone is handed over once it exists.
JOURNAL_READY = "pytest-kvm-journal-ready"
_PRELUDE = (
    "set -e",
    # The names among its arguments that are regular files (globs that matched
    # nothing stay as they are and are left out).
    'pytest_kvm_files() { for f in "$@"; do [ -f "$f" ] && echo "$f"; done; true; }',
)


def mac_bytes(mac: str) -> bytes:
    return bytes(int(part, 16) for part in mac.split(":"))


def substitute_mac(
    state: bytes, old: str, new: str, only: bytes | None = None
) -> tuple[bytes, int]:
    """The saved device state with every occurrence of MAC ``old`` (6 raw bytes) made
    ``new``, and how many there were. In a QEMU migration stream the MAC is in the
    virtio-net device (twice) and, on user networking, in slirp's DHCP table.
    ``only``: just the occurrences in the sections whose id holds it (``b"slirp"``):
    of the section ids below, the nearest one before the occurrence."""
    old_raw, new_raw = mac_bytes(old), mac_bytes(new)
    if only is None:
        return state.replace(old_raw, new_raw), state.count(old_raw)
    out, count, at = bytearray(state), 0, state.find(old_raw)
    while at >= 0:
        owner = max(_SECTION_IDS, key=lambda section: state.rfind(section, 0, at))
        if owner == only:
            out[at : at + len(old_raw)] = new_raw
            count += 1
        at = state.find(old_raw, at + 1)
    return bytes(out), count


# Section ids of a QEMU migration stream that can hold a NIC's MAC.
_SECTION_IDS = (b"slirp", b"virtio-net", b"e1000", b"rtl8139")


def write_clone_state(
    template_state: Path, dest: Path, old: str, new: str, what: str, only: bytes | None = None
) -> Path:
    """A private copy of a template's saved state for one clone, with its own MAC
    (``only``: see ``substitute_mac``)."""
    data, count = substitute_mac(template_state.read_bytes(), old, new, only)
    if count == 0:
        raise GuestError(
            f"{what}: the template's saved state {template_state} does not hold its MAC "
            f"{old}: cannot give the clone its own (was the template made by another "
            "QEMU or another version?)"
        )
    dest.write_bytes(data)
    return dest


@dataclass(frozen=True)
class CloneIdentity:
    """One clone's identity; ``old_mac`` is its template's (what the guest still has)."""

    old_mac: str
    mac: str
    hostname: str
    machine_id: str
    iaid: int
    host_key: KeyPair
    bridge: bool = False  # a bridge guest: drop the template's address, DHCP again

    @classmethod
    def new(cls, old_mac: str, mac: str, hostname: str, bridge: bool = False) -> CloneIdentity:
        return cls(
            old_mac=old_mac,
            mac=mac,
            hostname=hostname,
            machine_id=uuid.uuid4().hex,
            iaid=secrets.randbits(32),
            host_key=KeyPair.generate(f"host-{hostname}"),
            bridge=bridge,
        )

    def script(self, now: float, host_private_key: bool, more: str = "", nic: bool = True) -> str:
        """The shell script (one ``sh -c``) that makes the guest this clone;
        ``host_private_key``: write the private host key too (over SSH, where qemu-ga
        did not write it before the first connection); ``more``: a script to run
        before networkd restarts (the vlan NICs'); ``nic=False``: leave the primary
        NIC's MAC alone (tests). Few processes (each costs a lot under TCG): shell built-ins where
        they do, one grep or sed for many files."""
        lines = [*_PRELUDE]
        if self.mac != self.old_mac and nic and not self.bridge:
            lines += self._nic_lines("mac")  # first: what slirp must learn soonest
        lines.append(f"date -u -s @{now:.6f} >/dev/null")
        lines += self._hostname_lines()
        lines += self._host_key_lines(host_private_key)
        lines += self._machine_id_lines()
        # journald reads the new machine-id when it starts again (RESTART_JOURNALD).
        # Its SIGTERM is sent here, before the hand-over (shell built-ins: milliseconds;
        # systemd's restart overlaps the SSH handshake): a journal read from the
        # hand-over on (the error gate's cursor) then never meets the restart, which
        # renames the template's journal file and starts a new one.
        lines += RESTART_JOURNALD
        lines += self._journal_ready_lines()
        # networkd is not restarted on user networking: its DUID (from the
        # machine-id) and IAID are the clone's from its next start (a reboot); on its
        # own slirp network nobody else sees them meanwhile. A restart there crashed
        # Debian 13's kernel under TCG (an int3 Oops in netif_receive_skb_list_internal
        # as networkd's sockets closed: code patching that TCG got wrong).
        if not self.bridge:
            # What matters only to networkd's restart and the next boot (the IAID,
            # config files naming the old MAC) goes on in the background, after the
            # vlan NICs: each process costs about 0.07 s under TCG, systemctl 0.3 s,
            # and a clone's start waits for the foreground only.
            later = self._iaid_lines()
            if self.mac != self.old_mac:
                later += self._nic_lines("rest")
            return "\n".join([*lines, more, "(", *later, ") </dev/null >/dev/null 2>&1 &"]) + "\n"
        networkd = "systemd-networkd.socket systemd-networkd.service"
        lines += self._iaid_lines()
        # Not the template's DHCP client: it would ask for the template's lease
        # again when the link comes back up. It starts again with the clone's
        # identity, and the bridge's DHCP server gives the clone a lease of its own.
        lines += [
            "running=",
            "if [ -d /run/systemd/system ] && systemctl -q is-active systemd-networkd; then",
            f"  running=1; systemctl stop {networkd}",
            "fi",
        ]
        if self.mac != self.old_mac:
            lines += self._nic_lines("all" if nic else "rest")
        lines += ['if [ -n "$running" ]; then systemctl start ' + networkd + "; fi"]
        lines += [more]
        return "\n".join(lines) + "\n"

    def _iaid_lines(self) -> list[str]:
        """The DHCP client's IAID: a drop-in for every .network file that does DHCP."""
        return [
            f"nets=$(pytest_kvm_files {_NETWORKD_FILES})",
            "dhcp=",
            'if [ -n "$nets" ]; then',
            "  dhcp=$(grep -liE '^DHCP=(yes|true|ipv4|1)' $nets || true)",
            "fi",
            "dirs=",
            'for f in $dhcp; do dirs="$dirs /etc/systemd/network/${f##*/}.d"; done',
            'if [ -n "$dirs" ]; then',
            "  mkdir -p $dirs",
            "  for d in $dirs; do",
            f"    printf '[DHCPv4]\\nIAID={self.iaid}\\n' >\"$d/{_DROPIN}\"",
            "  done",
            "fi",
        ]

    def _hostname_lines(self) -> list[str]:
        hostname = shlex.quote(self.hostname)
        return [
            f"printf '%s' {hostname} >/proc/sys/kernel/hostname",
            f"printf '%s\\n' {hostname} >/etc/hostname",
            # cloud-init would put the template's hostname back at the next boot.
            "if [ -d /etc/cloud/cloud.cfg.d ]; then",
            "  printf 'preserve_hostname: true\\n' >/etc/cloud/cloud.cfg.d/99-pytest-kvm-clone.cfg",
            "fi",
        ]

    def _host_key_lines(self, private: bool) -> list[str]:
        """The clone's own ed25519 host key (truncating keeps the files' modes); no
        other type of host key stays shared with the template: sshd runs without."""
        lines = []
        if private:  # over SSH (else qemu-ga wrote both halves before SSH connected)
            lines += [
                f"printf '%s' {shlex.quote(self.host_key.private_openssh)} >{HOST_KEY}",
                f"printf '%s\\n' {shlex.quote(self.host_key.public_openssh)} >{HOST_KEY}.pub",
            ]
        lines += [
            "others=$(pytest_kvm_files /etc/ssh/ssh_host_rsa_key* /etc/ssh/ssh_host_ecdsa_key* "
            "/etc/ssh/ssh_host_dsa_key*)",
            'if [ -n "$others" ]; then rm -f $others; fi',
        ]
        if private:  # over SSH: qemu-ga did not write it, nor restart sshd for it
            lines.append(RELOAD_HOST_KEYS)
        return lines

    def _nic_lines(self, part: str = "all") -> list[str]:
        """The primary NIC takes the clone's MAC (which flushes the neighbour cache:
        the next packet ARPs, and the host side learns it); config files that name
        the old MAC name the new one. A bridge guest drops the template's address
        and lease first, so that it asks the bridge's DHCP server for its own.
        ``part``: "mac" (the MAC and its link-local address: first in the script,
        so that slirp learns it soonest), "rest" (the others, after) or "all"."""
        old, new = shlex.quote(self.old_mac), shlex.quote(self.mac)
        lines = [
            "dev=",
            "for d in /sys/class/net/*; do",
            '  a=; read -r a <"$d/address" 2>/dev/null || true',
            f'  if [ "$a" = {old} ] || [ "$a" = {new} ]; then dev=${{d##*/}}; fi',
            "done",
            f'if [ -z "$dev" ]; then echo "no network interface with MAC {self.old_mac}" >&2; '
            "exit 3; fi",
        ]
        if self.bridge:
            return [
                *lines,
                'ip -4 address flush dev "$dev"',
                "rm -f /run/systemd/netif/leases/* /var/lib/dhcp/*.leases",
                # Down and up: the kernel drops the IPv6 addresses made from the old
                # MAC (link-local, SLAAC) and makes the link-local one from the new
                # MAC (one ip process for the three steps). networkd is stopped.
                "printf 'link set dev %s down\\nlink set dev %s address %s\\n"
                "link set dev %s up\\n' "
                f'"$dev" "$dev" {new} "$dev" | ip -batch -',
                *self._config_lines(),
            ]
        if part in ("mac", "all"):
            # Not down and up on user networking: networkd would drop the address
            # with the carrier and SSH would wait for a new lease.
            # arp_notify: the kernel announces the new MAC (gratuitous ARP) as it
            # changes, and slirp, which learnt the old one from the guest's announce
            # after the restore, sends to the new one from then on.
            lines += [
                'notify="/proc/sys/net/ipv4/conf/$dev/arp_notify"',
                'if [ -f "$notify" ]; then echo 1 >"$notify"; fi',
                f'ip link set dev "$dev" address {new}',
                *self._link_local_lines(),
            ]
        if part in ("rest", "all"):
            lines += self._config_lines()
        return lines

    def _link_local_lines(self) -> list[str]:
        """The IPv6 link-local address made from the clone's MAC (EUI-64) in place
        of the template's, which the kernel keeps when only the MAC changes: one ip
        process (``-force``: a guest without IPv6 goes on)."""
        octets = [int(part, 16) for part in self.mac.split(":")]
        eui = [octets[0] ^ 0x02, octets[1], octets[2], 0xFF, 0xFE, octets[3], octets[4], octets[5]]
        groups = ":".join(f"{eui[i] << 8 | eui[i + 1]:x}" for i in range(0, 8, 2))
        return [
            'if [ -d "/proc/sys/net/ipv6/conf/$dev" ]; then',
            # (no IPv4 address of link scope here: DHCP's and slirp's are global)
            "  printf 'address flush dev %s scope link\\n"
            f'address add fe80::{groups}/64 dev %s scope link\\n\' "$dev" "$dev" '
            "| ip -force -batch - || true",
            "fi",
        ]

    def _config_lines(self) -> list[str]:
        old = shlex.quote(self.old_mac)
        return [
            f"configs=$(pytest_kvm_files {_NETWORK_CONFIG})",
            'if [ -n "$configs" ]; then',
            f"  named=$(grep -liF {old} $configs || true)",
            f'  if [ -n "$named" ]; then sed -i "s/{self.old_mac}/{self.mac}/Ig" $named; fi',
            "fi",
        ]

    def _machine_id_lines(self) -> list[str]:
        """A new /etc/machine-id (and D-Bus's copy if it is one, not a link); the
        journal directory named by the old one takes the new name, so that
        ``journalctl`` (which reads the current machine-id's) still finds this boot.
        Its active file is archived (the name journald gives a file it cannot reuse),
        so that the ``system.journal`` there is the restarted journald's own: the
        harness waits for it (``_journal_ready_lines``)."""
        new = self.machine_id
        archived = f"system@{secrets.token_hex(8)}-{secrets.token_hex(8)}.journal~"
        return [
            "old_id=; read -r old_id </etc/machine-id 2>/dev/null || true",
            f"printf '%s\\n' {new} >/etc/machine-id",
            "if [ -f /var/lib/dbus/machine-id ] && [ ! -L /var/lib/dbus/machine-id ]; then",
            f"  printf '%s\\n' {new} >/var/lib/dbus/machine-id",
            "fi",
            "moved=",
            'if [ -n "$old_id" ]; then',
            "  for j in /var/log/journal /run/log/journal; do",
            f'    if [ -d "$j/$old_id" ] && [ ! -e "$j/{new}" ]; then',
            f'      mv "$j/$old_id" "$j/{new}"',
            f'      if [ -f "$j/{new}/system.journal" ]; then',
            f'        mv "$j/{new}/system.journal" "$j/{new}/{archived}"',
            f'        moved="$moved $j/{new}/system.journal"',
            "      fi",
            "    fi",
            "  done",
            "fi",
        ]

    def _journal_ready_lines(self) -> list[str]:
        """Where the restarted journald may write (a ``system.journal`` in each journal
        directory that had one; it writes to one of them: /var's when persistent),
        for the harness to wait for the first of them:
        until then, what a test logs waits in journald's socket, and a ``journalctl``
        does not show it (seen in a clone's first command, every time, at load 4)."""
        return [
            'if [ -n "$journald" ]; then',
            f'  for f in $moved; do echo "{JOURNAL_READY} $f"; done',
            "fi",
        ]

    @staticmethod
    def journal_files(output: str) -> list[str]:
        """The journal files that the script's ``output`` says to wait for."""
        prefix = JOURNAL_READY + " "
        return [line[len(prefix) :] for line in output.splitlines() if line.startswith(prefix)]
