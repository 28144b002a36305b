"""A small client for the QEMU guest agent (qemu-ga) on a guest's virtio-serial socket.

The agent protocol is QMP-like JSON lines without a greeting; ``guest-sync`` first
discards whatever an earlier client left in the channel. qemu.qmp speaks QMP only,
hence this client.
"""

from __future__ import annotations

import base64
import json
import secrets
import socket
import time
from pathlib import Path
from typing import Any


class GuestAgentError(Exception):
    pass


class AgentCalls:
    """Agent commands built on ``execute``/``execute_args``, for every transport:
    ``connect`` first, ``close`` (idempotent) after; also a context manager."""

    def connect(self, timeout: float) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> AgentCalls:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def execute(self, command: str, timeout: float = 10.0, **arguments: Any) -> Any:
        return self.execute_args(command, arguments, timeout)

    def execute_args(self, command: str, arguments: dict[str, Any], timeout: float = 10.0) -> Any:
        raise NotImplementedError

    def write_file(self, path: str, text: str) -> None:
        """Write (truncate) a file in the guest."""
        handle = self.execute("guest-file-open", path=path, mode="w")
        try:
            data = base64.b64encode(text.encode()).decode()
            self.execute_args("guest-file-write", {"handle": handle, "buf-b64": data})
        finally:
            self.execute("guest-file-close", handle=handle)


class GuestAgent(AgentCalls):
    """One connection to qemu-ga; ``close`` is idempotent."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock: socket.socket | None = None
        self._buffer = b""

    def connect(self, timeout: float) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(self.path))
        except OSError:
            sock.close()
            raise
        self._sock = sock
        token = secrets.randbelow(1 << 31)
        self._send({"execute": "guest-sync", "arguments": {"id": token}})
        deadline = time.monotonic() + timeout
        while True:  # skip answers meant for an earlier client
            reply = self._receive(deadline)
            if reply.get("return") == token:
                return

    def execute_args(self, command: str, arguments: dict[str, Any], timeout: float = 10.0) -> Any:
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        self._send(message)
        reply = self._receive(time.monotonic() + timeout)
        if "error" in reply:
            error = reply["error"]
            raise GuestAgentError(f"{command}: {error.get('desc', error)}")
        return reply.get("return")

    def _send(self, message: dict[str, Any]) -> None:
        if self._sock is None:
            raise GuestAgentError("not connected")
        self._sock.sendall(json.dumps(message).encode() + b"\n")

    def _receive(self, deadline: float) -> dict[str, Any]:
        assert self._sock is not None
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the guest agent did not answer")
            self._sock.settimeout(remaining)
            chunk = self._sock.recv(65536)
            if not chunk:
                raise GuestAgentError("the guest agent closed the connection")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        # qemu-ga may prefix a 0xff sync byte; skip anything before the JSON.
        start = line.find(b"{")
        try:
            reply = json.loads(line[start:]) if start >= 0 else {}
        except ValueError:
            reply = {}
        return reply if isinstance(reply, dict) else {}

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> GuestAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
