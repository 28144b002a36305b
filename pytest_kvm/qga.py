"""The QEMU guest agent (qemu-ga) client, on a guest's virtio-serial socket.

The agent speaks QMP without the greeting and the capabilities negotiation, so
``GuestAgent`` is qemu.qmp's ``QMPClient`` with ``await_greeting`` and ``negotiate``
off, as its documentation says for qemu-ga. Ours is only ``guest-sync``: the channel
outlives connections, so a reply meant for an earlier client may still be in it;
a ``guest-sync`` with a fresh token, under an id of our own, marks where our replies
start (qemu.qmp drops replies whose id it does not know). The client runs on one
event loop thread shared by all agents of the process, so callers stay synchronous.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
import threading
from collections.abc import Coroutine
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, QMPClient, QMPError

T = TypeVar("T")


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


class _Loop:
    """One daemon event loop thread for every agent client of this process (started
    on first use): an agent connection is short, a thread per one would be waste."""

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def get(cls) -> asyncio.AbstractEventLoop:
        with cls._lock:
            if cls._loop is None or cls._loop.is_closed():
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="qga", daemon=True).start()
                cls._loop = loop
            return cls._loop


class GuestAgent(AgentCalls):
    """One connection to qemu-ga; ``close`` is idempotent."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._client: QMPClient | None = None

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, _Loop.get())
        try:
            return future.result(max(timeout, 0.001))
        except FutureTimeout:
            future.cancel()
            raise TimeoutError("the guest agent did not answer") from None

    def connect(self, timeout: float) -> None:
        client = QMPClient(f"qga-{self.path.parent.name}")
        client.await_greeting = False
        client.negotiate = False
        self._client = client
        token = secrets.randbelow(1 << 31)
        try:
            self._run(self._connect(client, token), timeout)
        except ConnectError as exc:
            self.close()
            if isinstance(exc.exc, OSError):
                raise exc.exc from None
            raise GuestAgentError(f"cannot connect to the guest agent: {exc}") from None
        except BaseException:
            self.close()
            raise

    async def _connect(self, client: QMPClient, token: int) -> None:
        await client.connect(str(self.path))
        sync = {"execute": "guest-sync", "arguments": {"id": token}, "id": f"sync-{token}"}
        try:
            reply = await client._raw(sync, assign_id=False)  # our id: see the module doc
        except ExecInterruptedError:
            raise GuestAgentError("the guest agent closed the connection") from None
        if reply.get("return") != token:
            raise GuestAgentError(f"guest-sync answered {reply!r}, not {token}")

    def execute_args(self, command: str, arguments: dict[str, Any], timeout: float = 10.0) -> Any:
        if self._client is None:
            raise GuestAgentError("not connected")
        try:
            return self._run(self._client.execute(command, arguments or None), timeout)
        except ExecuteError as exc:
            raise GuestAgentError(f"{command}: {exc.error.error.desc}") from None
        except (ExecInterruptedError, EOFError):
            raise GuestAgentError("the guest agent closed the connection") from None
        except QMPError as exc:
            raise GuestAgentError(f"{command}: {exc}") from None

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):  # closing: the socket may be gone
                self._run(client.disconnect(), 10)

    def __enter__(self) -> GuestAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
