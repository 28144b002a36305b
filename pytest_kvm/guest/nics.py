"""A guest's network: the checks and reservations before it starts (bridge MAC, tap,
vlan ports), its DHCP address, the bridge settle, vlan NICs inside the guest, port
forwards and virtual cables. Owns the network the guest really uses (a bridge
without a tap of ours gets QEMU's bridge helper)."""

from __future__ import annotations

import dataclasses
import shlex
import time
from collections.abc import Callable

from ..backends.base import Machine, Nic
from ..config import DEFAULT_BRIDGE_HELPER, NetworkSpec
from ..errors import GuestCrashed, GuestError, GuestTimeout, KvmConfigError
from ..network import (
    USER_NET_HOST,
    MacReservation,
    Tap,
    bridge_fdb_macs,
    bridge_problem,
    check_port_number,
    free_port,
    has_net_admin,
    helper_problem,
    ipv4_from_agent,
    ipv4_from_console,
    no_tap_message,
    port_in_use,
)
from ..qga import AgentCalls, GuestAgentError
from ..run import RunContext
from ..util import tail_text
from ..vlan import Vlan, VlanPort
from .commands import CommandResult
from .state import GuestState

# Find the NIC by its old or new MAC, give it the new one, then a static address.
_VLAN_SCRIPT = r"""
pytest_kvm_vlan() {
  dev=
  for d in /sys/class/net/*; do
    a=$(cat "$d/address")
    if [ "$a" = "$1" ] || [ "$a" = "$2" ]; then dev=${d##*/}; fi
  done
  if [ -z "$dev" ]; then echo "no network interface with MAC $1 or $2" >&2; return 3; fi
  # down and up: no IPv6 link-local address made from the template's MAC stays
  ip link set dev "$dev" down
  ip link set dev "$dev" address "$2"
  ip link set dev "$dev" up
  if systemctl is-active -q systemd-networkd 2>/dev/null; then
    mkdir -p /etc/systemd/network
    printf "$4" >"/etc/systemd/network/05-pytest-kvm-$2.network"
    networkctl reload
    networkctl reconfigure "$dev"
  else
    ip address flush dev "$dev"
    ip address add "$3" dev "$dev"
    ip link set dev "$dev" up
  fi
  i=0
  until ip -o -4 address show dev "$dev" | grep -qF " ${3} "; do
    i=$((i + 1))
    if [ "$i" -gt 200 ]; then echo "$dev never got $3" >&2; return 4; fi
    sleep 0.1
  done
}
"""


# Wait for cloud-init, then print the IPv4 address of the NIC with MAC {mac} (60 s).
_SETTLE_BRIDGE = r"""
if command -v cloud-init >/dev/null; then cloud-init status --wait >/dev/null || true; fi
i=0
while [ "$i" -lt 300 ]; do
  for d in /sys/class/net/*; do
    if [ "$(cat "$d/address")" = {mac} ]; then
      a=$(ip -4 -o address show dev "${{d##*/}}" scope global |
          sed -n 's/.* inet \([0-9.]*\)\/.*/\1/p' | head -n 1)
      if [ -n "$a" ]; then echo "$a"; exit 0; fi
    fi
  done
  i=$((i + 1))
  sleep 0.2
done
echo "no IPv4 address on the NIC with MAC {mac}" >&2
exit 1
"""

Run = Callable[..., CommandResult]  # guest.run(cmd, timeout=...)


class Nics:
    """The network side of one guest; ``template_vlan_macs``: a clone's NICs' old MACs."""

    def __init__(
        self,
        state: GuestState,
        network: NetworkSpec,
        vlans: tuple[Vlan | None, ...],
        *,
        libvirt: bool,
        remote: bool,
        template_vlan_macs: tuple[str, ...] | None = None,
    ) -> None:
        self._state = state
        self.network = network  # what the machine is given: may gain the bridge helper
        self._vlans = vlans
        self._libvirt = libvirt
        self._remote = remote  # a remote hypervisor: forwards on its host's 127.0.0.1
        self._template_vlan_macs = template_vlan_macs
        self.mac_reservation: MacReservation | None = None
        self.tap: Tap | None = None
        self.vlan_ports: list[tuple[Vlan | None, Nic, VlanPort | None]] = []
        self.forwards: dict[int, int] = {}
        self.vlans_done = False  # the agent configured the vlan NICs already

    @property
    def user(self) -> bool:
        return self.network.kind == "user"

    @property
    def nics(self) -> tuple[Nic, ...]:
        return tuple(nic for _, nic, _ in self.vlan_ports)

    def prepare(self, run: RunContext) -> None:
        """Check the network, reserve the bridge MAC and tap, attach to vlans."""
        state = self._state
        assert state.sockdir is not None
        spec = self.network
        if self._libvirt and spec.kind != "user":
            # libvirt makes the tap; a MAC of our own, kept off local bridges' FDBs.
            if spec.kind == "bridge" and spec.helper:
                raise KvmConfigError(
                    f"{state.what}: network {spec}: the libvirt backend makes its own "
                    "taps; drop ',helper'"
                )
            local = not self._remote and spec.kind == "bridge"
            self.mac_reservation = MacReservation.reserve(
                taken=bridge_fdb_macs(spec.name) if local else set()
            )
            state.mac = self.mac_reservation.mac
        elif spec.kind == "bridge":
            self._prepare_bridge(spec)
            self.mac_reservation = MacReservation.reserve(taken=bridge_fdb_macs(spec.name))
            state.mac = self.mac_reservation.mac
        elif spec.kind != "user":
            raise KvmConfigError(
                f"{state.what}: network {spec} is not supported by the qemu backend"
            )
        for index, vlan in enumerate(self._vlans):
            netdev_id = f"vlan{index}"
            mac = run.identity.mac_for(f"{state.name}/{netdev_id}")
            if vlan is None:  # a template's NIC: on a hub of its own, connected to nothing
                nic = Nic(netdev_id, f"hubport,id={netdev_id},hubid={index + 1}", mac)
                self.vlan_ports.append((None, nic, None))
                continue
            port = vlan.attach(state.name, netdev_id, mac, state.sockdir / f"{netdev_id}.sock")
            self.vlan_ports.append((vlan, Nic(netdev_id, port.netdev_arg(), mac), port))

    def _prepare_bridge(self, spec: NetworkSpec) -> None:
        what = self._state.what
        problem = bridge_problem(spec.name)
        if problem:
            raise KvmConfigError(f"{what}: network {spec}: {problem}")
        if spec.helper:
            reason = helper_problem(spec.helper, spec.name)
            if reason:
                raise KvmConfigError(f"{what}: network {spec}: {reason}")
        elif has_net_admin():
            self.tap = Tap(spec.name)
        else:
            reason = helper_problem(DEFAULT_BRIDGE_HELPER, spec.name)
            if reason:
                raise KvmConfigError(f"{what}: {no_tap_message(spec.name, reason)}")
            self.network = dataclasses.replace(spec, helper=DEFAULT_BRIDGE_HELPER)

    def close(self) -> None:
        """Give back the tap, the vlan ports and the MAC."""
        if self.tap is not None:
            self.tap.close()
        for vlan, _, _ in self.vlan_ports:
            if vlan is not None:
                vlan.detach(self._state.name)
        if self.mac_reservation is not None:
            self.mac_reservation.release()

    def learn_address(self, deadline: float, boot_timeout: float) -> str:
        """The IPv4 address the guest's NIC got by DHCP: from the guest agent, or from
        cloud-init's network table on the console."""
        state = self._state
        agent: AgentCalls | None = None
        seen = "the guest agent never answered"
        try:
            while True:
                dead = state.alive()
                if dead:
                    raise GuestCrashed(
                        f"{dead}; last console lines:\n{state.console_tail(20)}", state.name
                    )
                address = ipv4_from_console(state.console_tail(200), state.mac)
                if not address and state.machine is not None:
                    address = state.machine.leased_address(state.mac)  # the backend's DHCP
                if address:
                    return address
                try:
                    if agent is None:
                        assert state.machine is not None
                        agent = state.machine.agent()
                        agent.connect(2.0)
                    interfaces = agent.execute("guest-network-get-interfaces", timeout=5.0)
                    address = ipv4_from_agent(interfaces or [], state.mac)
                    if address:
                        return address
                    seen = f"the guest agent reported no IPv4 address for MAC {state.mac}"
                except (OSError, TimeoutError, GuestAgentError) as exc:
                    if agent is not None:
                        agent.close()
                    agent = None
                    if not isinstance(exc, TimeoutError):
                        seen = f"the guest agent: {exc}"
                if time.monotonic() > deadline:
                    raise GuestTimeout(
                        f"{state.what}: no DHCP address on {self.network} "
                        f"for MAC {state.mac} after "
                        f"{boot_timeout:.0f} s ({seen}); is a DHCP server on that "
                        f"segment? Last console lines:\n{state.console_tail(20)}",
                        state.name,
                    )
                time.sleep(1.0)
        finally:
            if agent is not None:
                agent.close()

    def settle_bridge(self, deadline: float, run: Run, reconnect: Callable[[], None]) -> None:
        """A bridge guest is ready once cloud-init is done and its DHCP address holds:
        while cloud-init still runs, the guest's network may still change under a
        test that reaches it from outside (seen: an address gone for a moment).
        ``reconnect``: SSH again, to the address it holds now."""
        state = self._state
        remaining = max(30.0, deadline - time.monotonic())
        result = run(_SETTLE_BRIDGE.format(mac=shlex.quote(state.mac)),
                     timeout=remaining / state.timeout_scale)  # fmt: skip
        address = result.stdout.strip()
        if result.exit_status != 0 or not address:
            raise GuestTimeout(
                f"{state.what}: its NIC {state.mac} on bridge "
                f"{self.network.name!r} lost its IPv4 address {state.address} while "
                f"booting and did not get one back: {tail_text(result.stderr, 3)}",
                state.name,
            )
        if address != state.address:
            state.address = address
            reconnect()

    def configure_vlans(self, run: Run) -> None:
        """Give each vlan NIC its MAC and static address inside the guest.

        A clone's NIC still has its template's MAC: the guest sets the new one (QEMU
        follows it). With systemd-networkd the address goes into a .network file,
        so it survives carrier loss (``set_link``) and reboots; otherwise ``ip``."""
        result = run(self.vlan_script(), timeout=60)
        if result.exit_status != 0:
            raise GuestError(
                f"{self._state.what}: could not configure its vlan NICs "
                f"(exit {result.exit_status}): {tail_text(result.stderr or result.stdout)}",
                self._state.name,
            )

    def vlan_script(self) -> str:
        lines = ["set -e"]
        for index, (_, nic, port) in enumerate(self.vlan_ports):
            if port is None:
                continue
            old = (
                self._template_vlan_macs[index] if self._template_vlan_macs is not None else nic.mac
            )
            cidr = f"{port.address}/{port.prefixlen}"
            unit = (
                f"[Match]\\nMACAddress={nic.mac}\\n[Link]\\nRequiredForOnline=no\\n"
                f"[Network]\\nAddress={cidr}\\nLinkLocalAddressing=no\\nIPv6AcceptRA=no\\n"
                "ConfigureWithoutCarrier=yes\\nIgnoreCarrierLoss=yes\\n"
            )
            lines.append(
                f"pytest_kvm_vlan {shlex.quote(old)} {shlex.quote(nic.mac)} "
                f"{shlex.quote(cidr)} {shlex.quote(unit)}"
            )
        return _VLAN_SCRIPT + "\n".join(lines)

    @property
    def host_address(self) -> str | None:
        return USER_NET_HOST if self.user else None

    @property
    def forwarded_ports(self) -> dict[int, int]:
        ports = {22: self._state.port} if self.user else {}
        return {**ports, **self.forwards}

    def forward_port(self, guest_port: int, host_port: int | None = None) -> int:
        """See ``Guest.forward_port``."""
        __tracebackhide__ = True
        state = self._state
        check_port_number(guest_port, "guest_port")
        what = f"{state.what}: forward_port({guest_port}"
        if not self.user:
            raise KvmConfigError(
                f"{what}): forwarding is for user networking; on {self.network} "
                f"reach the guest at guest.address ({state.address}) directly"
            )
        if host_port is not None:
            check_port_number(host_port, "host_port")
            what += f", host_port={host_port})"
            if not self._remote and port_in_use(host_port):
                raise KvmConfigError(f"{what}: 127.0.0.1:{host_port} is already in use on the host")
        else:
            what += ")"
        machine = self._machine()
        answer = ""
        for _ in range(5):
            port = host_port or free_port()
            rule = f"tcp:127.0.0.1:{port}-:{guest_port}"
            answer = str(
                machine.qmp(
                    "human-monitor-command",
                    **{"command-line": f"hostfwd_add {machine.primary_netdev} {rule}"},
                )
            )
            if not answer.strip():
                self.forwards[guest_port] = port
                return port
            if host_port is not None:
                break
        raise GuestError(f"{what}: QEMU refused: {answer.strip()}", state.name)

    def _machine(self) -> Machine:
        assert self._state.machine is not None
        return self._state.machine

    def set_link(self, up: bool, vlan: Vlan | None = None) -> None:
        """See ``Guest.set_link``."""
        what = self._state.what
        ports = [(v, nic) for v, nic, port in self.vlan_ports if port is not None]
        if vlan is not None:
            matching = [nic for v, nic in ports if v is vlan]
            if not matching:
                raise KvmConfigError(f"{what}: set_link: not on vlan {vlan.name!r}")
            netdev = matching[0].netdev_id
        elif len(ports) == 1:
            netdev = ports[0][1].netdev_id
        elif not ports:
            netdev = self._machine().primary_netdev
        else:
            raise KvmConfigError(f"{what}: set_link: the guest is on {len(ports)} vlans; say which")
        self._machine().qmp("set_link", name=netdev, up=bool(up))
