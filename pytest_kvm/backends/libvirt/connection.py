"""libvirt connections: the lazily imported bindings, one cached connection per URI
and process (keepalive, the default event loop on a thread of its own), the SSH jump
to a remote hypervisor's host, and calls that may never return."""

from __future__ import annotations

import contextlib
import threading
import time
import urllib.parse
from collections.abc import Callable
from types import ModuleType
from typing import Any

from ...errors import KvmConfigError, KvmUnavailable
from ...ssh import SshJump
from ...util import Background

DESTROY_WAIT = 60.0  # s for a destroy: libvirt's own SIGTERM, SIGKILL and job waits fit

# A keepalive probe every 5 s, the link dead after 5 unanswered: calls on a dead
# connection (a qemu+ssh link gone quiet, a stopped daemon) fail in about 30 s, and
# a daemon slow under load (its domains die with our connection) has the time.
KEEPALIVE = (5, 5)


def load_libvirt() -> tuple[ModuleType, ModuleType]:
    """``libvirt`` and ``libvirt_qemu``, or KvmUnavailable naming what to install."""
    try:
        import libvirt
        import libvirt_qemu
    except ImportError:
        raise KvmUnavailable(
            "the libvirt backend needs libvirt-python (pip install libvirt-python; "
            "building it needs Debian's libvirt-dev, pkg-config and gcc)"
        ) from None
    return libvirt, libvirt_qemu


def _quiet_errors(libvirt: ModuleType) -> None:
    # libvirt prints every error to stderr by default; we raise them instead.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


def is_remote(uri: str) -> bool:
    """Whether ``uri`` reaches another host (a transport or a host name)."""
    parsed = urllib.parse.urlsplit(uri)
    transport = parsed.scheme.partition("+")[2]
    return bool(parsed.hostname) or transport not in ("", "unix")


SSH_TRANSPORTS = ("ssh", "libssh", "libssh2")


def remote_problem(uri: str) -> str:
    """ "" if guests on ``uri`` can be reached, else why not: a remote hypervisor is
    reached through its host's SSH, so its URI must use an SSH transport."""
    if not is_remote(uri):
        return ""
    parsed = urllib.parse.urlsplit(uri)
    if parsed.scheme.partition("+")[2] not in SSH_TRANSPORTS:
        return (
            f"--kvm-uri {uri}: guests on a remote hypervisor are reached through its "
            "host's SSH; use qemu+ssh://USER@HOST/system"
        )
    return ""


_jumps: dict[str, SshJump] = {}

_connections: dict[str, Any] = {}

_connections_lock = threading.Lock()


def jump_for(uri: str) -> SshJump | None:
    """The SSH connection to ``uri``'s host (one per URI and process), or None for a
    local hypervisor, whose guests' forwards are on our own 127.0.0.1."""
    if not is_remote(uri):
        return None
    with _connections_lock:
        if uri not in _jumps:
            parsed = urllib.parse.urlsplit(uri)
            assert parsed.hostname is not None
            _jumps[uri] = SshJump(parsed.username, parsed.hostname, parsed.port)
        return _jumps[uri]


_event_loop: list[threading.Thread] = []

_event_loop_lock = threading.Lock()


def ensure_event_loop() -> None:
    """libvirt's default event loop on a thread of its own, once per process, before
    the first connection: it drives connections' sockets in the background, which
    non-blocking streams (the console) and keepalive need."""
    libvirt, _ = load_libvirt()
    with _event_loop_lock:
        if _event_loop:
            return
        libvirt.virEventRegisterDefaultImpl()
        thread = threading.Thread(target=_run_events, args=(libvirt,), name="libvirt-events",
                                  daemon=True)  # fmt: skip
        thread.start()
        _event_loop.append(thread)


def open_connection(uri: str) -> Any:
    """A new libvirt connection (libvirtError if it cannot be had), with keepalive
    where its driver has it (the remote one: every daemon's; not the built-in test
    driver)."""
    libvirt, _ = load_libvirt()
    ensure_event_loop()
    conn = libvirt.open(uri)
    with contextlib.suppress(libvirt.libvirtError):
        conn.setKeepAlive(*KEEPALIVE)
    return conn


def _run_events(libvirt: ModuleType) -> None:
    while True:
        if libvirt.virEventRunDefaultImpl() < 0:
            time.sleep(0.1)


def connect(uri: str) -> Any:
    """One libvirt connection per URI and process, checked to be a QEMU hypervisor.

    Every failure is a KvmConfigError naming the URI and saying why."""
    libvirt, _ = load_libvirt()
    with _connections_lock:
        conn = _connections.get(uri)
        if conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                if conn.isAlive():
                    return conn
        _quiet_errors(libvirt)
        try:
            conn = open_connection(uri)
        except libvirt.libvirtError as exc:
            raise KvmConfigError(_connect_message(uri, exc)) from None
        try:
            kind = conn.getType()
        except libvirt.libvirtError as exc:
            conn.close()
            raise KvmConfigError(f"--kvm-uri {uri}: {first_line(exc)}") from None
        if kind != "QEMU":
            conn.close()
            raise KvmConfigError(
                f"--kvm-uri {uri}: that hypervisor is {kind}, not QEMU; pytest-kvm runs "
                "QEMU guests (use qemu:///system, qemu:///session or qemu+ssh://HOST/system)"
            )
        _connections[uri] = conn
        return conn


def forget_connection(uri: str, conn: Any) -> None:
    """Stop handing out ``conn`` (a call on it did not return): later guests get a new
    connection. It is not closed, as closing could block as well; its auto-destroy
    domains go when this process exits."""
    with _connections_lock:
        if _connections.get(uri) is conn:
            del _connections[uri]


def call_within(seconds: float, call: Callable[[], object]) -> bool:
    """Run a libvirt call that might never return (a stuck client connection or
    daemon) on a thread of its own; True when it returned or raised within seconds."""
    return Background(call, "libvirt-call").wait(seconds)


def close_connections() -> None:
    """Close every cached connection: libvirt destroys their auto-destroy domains."""
    with _connections_lock:
        for conn in _connections.values():
            with contextlib.suppress(Exception):
                conn.close()
        _connections.clear()
        for jump in _jumps.values():
            jump.close()
        _jumps.clear()


def _connect_message(uri: str, exc: Exception) -> str:
    text = first_line(exc)
    lowered = text.lower()
    # Refused by the daemon: file permissions on its socket, or polkit (which needs
    # the system bus to ask) for users outside the libvirt group.
    denied = ("permission denied", "authentication", "polkit", "system bus", "access denied")
    if any(word in lowered for word in denied):
        hint = "you may not use it: run as root, join the 'libvirt' group, or use qemu:///session"
    elif "no such file" in lowered or "connection refused" in lowered:
        hint = "is libvirtd running there? (Debian: libvirt-daemon-system; start libvirtd)"
    elif "no connection driver" in lowered or "unsupported" in lowered:
        hint = "this libvirt has no driver for it (Debian: libvirt-daemon-driver-qemu)"
    else:
        hint = "check the URI, the host and its libvirtd"
    return f"--kvm-uri {uri}: cannot connect ({text}); {hint}"


def first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [""])[0]
