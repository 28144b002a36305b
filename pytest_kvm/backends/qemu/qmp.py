"""A qemu.qmp client on an event loop thread of its own (QMP server side: QEMU
connects to our socket), collecting events while tests run."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Coroutine
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

from qemu.qmp import QMPClient

T = TypeVar("T")


class Qmp:
    """A qemu.qmp client on its own event loop thread, so events arrive while tests run."""

    def __init__(self, name: str) -> None:
        self.client = QMPClient(name)
        self.events: list[dict[str, Any]] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"qmp-{name}", daemon=True
        )
        self._thread.start()
        self._collector: asyncio.Task[None] | None = None

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except FutureTimeout:
            future.cancel()
            raise TimeoutError(f"QMP did not answer within {timeout} s") from None

    def start_server(self, path: str) -> None:
        self.run(self.client.start_server(path), 10)

    def accept(self, timeout: float, alive: Any) -> None:
        future = asyncio.run_coroutine_threadsafe(self.client.accept(), self._loop)
        deadline = time.monotonic() + timeout
        while True:
            try:
                future.result(0.05)
                break
            except FutureTimeout:
                if not alive() or time.monotonic() > deadline:
                    future.cancel()
                    raise TimeoutError("QEMU did not connect to QMP") from None
        self._collector = self.run(self._start_collector(), 5)

    async def getfd(self, fd: int, name: str) -> None:
        """Hand QEMU a descriptor (SCM_RIGHTS), named for later commands."""
        self.client.send_fd_scm(fd)
        await self.client.execute("getfd", {"fdname": name})

    async def _start_collector(self) -> asyncio.Task[None]:
        return asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        async for event in self.client.events:
            self.events.append(dict(event))

    async def _shutdown(self) -> None:
        # Closing: the socket may already be gone.
        with contextlib.suppress(Exception):
            await self.client.disconnect()
        if self._collector is not None:
            self._collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._collector

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            self.run(self._shutdown(), 10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()
