"""A domain's serial console: a non-blocking libvirt stream on a connection of its
own, copied into the guest's local serial log, and fed from a local UNIX socket."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from pathlib import Path
from typing import Any

from .connection import DESTROY_WAIT, call_within, load_libvirt, open_connection


def open_console(uri: str, domain: Any) -> tuple[Any, Any]:
    """The domain's console as a non-blocking stream on a libvirt connection of its
    own: (connection, stream). A thread blocked in a stream read on the connection
    the domain was made on held that connection, and ``destroy`` on it waited
    forever (seen in CI); apart, and never blocking, neither waits on the other."""
    libvirt, _ = load_libvirt()
    conn = open_connection(uri)
    try:
        mine = conn.lookupByUUIDString(domain.UUIDString())
        stream = conn.newStream(libvirt.VIR_STREAM_NONBLOCK)
        mine.openConsole(None, stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
    except BaseException:
        with contextlib.suppress(Exception):
            conn.close()
        raise
    return conn, stream


class ConsolePump:
    """Copies the domain's console stream (non-blocking, on ``conn``, a connection of
    its own) into the local serial log, and what is written to a local UNIX socket
    (``Console.send``) into the stream."""

    POLL = 0.02  # s between reads of an empty stream

    def __init__(self, conn: Any, stream: Any, log: Path, sock_path: Path) -> None:
        self._conn = conn
        self._stream = stream
        self._log = log.open("ab", buffering=0)
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self._server.bind(str(sock_path))
        finally:
            os.umask(old)
        self._server.listen(4)
        self._sock_path = sock_path
        self._stop = threading.Event()
        self._send_lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, name="libvirt-console", daemon=True)
        self._acceptor = threading.Thread(target=self._accept, name="console-in", daemon=True)
        self._reader.start()
        self._acceptor.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                with self._send_lock:
                    data = self._stream.recv(65536)
            except Exception:
                return
            if data == -2:  # nothing yet
                self._stop.wait(self.POLL)
                continue
            if not data or isinstance(data, int):  # end of stream
                return
            self._log.write(data)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._pass_in, args=(conn,), daemon=True).start()

    def _pass_in(self, conn: socket.socket) -> None:
        with conn:
            while not self._stop.is_set():
                try:
                    data = conn.recv(4096)
                except OSError:
                    return
                if not data:
                    return
                if not self._send(data):
                    return

    def _send(self, data: bytes) -> bool:
        """All of ``data`` into the stream; False once it is gone."""
        while data and not self._stop.is_set():
            try:
                with self._send_lock:
                    sent = self._stream.send(data)
            except Exception:
                return False
            if sent == -2:  # full: later
                self._stop.wait(self.POLL)
                continue
            data = data[sent:]
        return True

    def close(self) -> None:
        """Stop copying, drop the stream and close its connection (neither can block
        the domain's own connection)."""
        if self._stop.is_set():
            return
        self._stop.set()
        with contextlib.suppress(Exception):
            self._server.shutdown(socket.SHUT_RDWR)  # wakes the accept() in _accept
        with contextlib.suppress(Exception):
            self._server.close()
        self._sock_path.unlink(missing_ok=True)
        self._reader.join(5)
        call_within(DESTROY_WAIT, self._stream.abort)
        call_within(DESTROY_WAIT, self._conn.close)
        self._log.close()
