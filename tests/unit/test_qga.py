"""The guest-agent client against a fake qemu-ga on a UNIX socket."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_kvm.qga import GuestAgent, GuestAgentError


class FakeAgent:
    """qemu-ga's wire behaviour: no greeting, one JSON reply per line, ``id`` echoed.
    Every connection first gets replies left over from an earlier client."""

    def __init__(self, path: Path, silent: bool = False) -> None:
        self.path = path
        self.silent = silent
        self.files: dict[str, bytes] = {}
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn: socket.socket) -> None:
        # Like qemu-ga's streaming JSON parser: requests need no newline between them.
        decoder, buffer = json.JSONDecoder(), ""
        with conn:
            conn.sendall(b'{"return": {}, "id": "__qmp#00000"}\n{"return": 12345}\n')
            while chunk := conn.recv(65536):
                buffer += chunk.decode()
                while buffer.strip():
                    try:
                        request, end = decoder.raw_decode(buffer.lstrip())
                    except ValueError:
                        break  # the rest is still on its way
                    buffer = buffer.lstrip()[end:]
                    if self.silent:
                        continue
                    reply = self._answer(request["execute"], request.get("arguments", {}))
                    if "id" in request:
                        reply["id"] = request["id"]
                    conn.sendall(json.dumps(reply).encode() + b"\n")

    def _answer(self, command: str, args: dict[str, Any]) -> dict[str, Any]:
        if command == "guest-sync":
            return {"return": args["id"]}
        if command == "guest-ping":
            return {"return": {}}
        if command == "guest-file-open":
            self.files[args["path"]] = b""
            return {"return": 1000}
        if command == "guest-file-write":
            path = next(iter(self.files))
            self.files[path] += base64.b64decode(args["buf-b64"])
            return {"return": {"count": len(self.files[path]), "eof": False}}
        if command == "guest-file-close":
            return {"return": {}}
        return {
            "error": {
                "class": "CommandNotFound",
                "desc": f"The command {command} has not been found",
            }
        }

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeAgent]:
    agent = FakeAgent(tmp_path / "qga.sock")
    yield agent
    agent.close()


def test_commands_answer_after_stale_replies_are_skipped(fake: FakeAgent) -> None:
    with GuestAgent(fake.path) as agent:
        agent.connect(5)
        assert agent.execute("guest-ping") == {}
        agent.write_file("/etc/hostname", "web\n")
    assert fake.files == {"/etc/hostname": b"web\n"}


def test_an_agent_error_is_a_guest_agent_error(fake: FakeAgent) -> None:
    with GuestAgent(fake.path) as agent:
        agent.connect(5)
        with pytest.raises(GuestAgentError, match="guest-nope: The command guest-nope"):
            agent.execute("guest-nope")
        assert agent.execute("guest-ping") == {}  # the connection stays usable


def test_a_silent_agent_times_out_and_a_missing_socket_is_an_os_error(tmp_path: Path) -> None:
    silent = FakeAgent(tmp_path / "silent.sock", silent=True)
    try:
        agent = GuestAgent(silent.path)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            agent.connect(0.5)
        assert time.monotonic() - t0 < 3
        agent.close()
        agent.close()  # idempotent
    finally:
        silent.close()
    with pytest.raises(OSError):
        GuestAgent(tmp_path / "missing.sock").connect(1)


def test_not_connected_is_refused(tmp_path: Path) -> None:
    with pytest.raises(GuestAgentError, match="not connected"):
        GuestAgent(tmp_path / "x.sock").execute("guest-ping")
