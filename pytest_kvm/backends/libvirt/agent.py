"""qemu-ga through libvirt (``qemuAgentCommand``)."""

from __future__ import annotations

import json
from typing import Any

from ...qga import AgentCalls, GuestAgentError
from .connection import first_line, load_libvirt


class LibvirtAgent(AgentCalls):
    """qemu-ga through libvirt (``qemuAgentCommand``): the GuestAgent interface."""

    def __init__(self, domain: Any) -> None:
        self._domain = domain

    def connect(self, timeout: float) -> None:
        self.execute("guest-ping", timeout=timeout)

    def execute_args(self, command: str, arguments: dict[str, Any], timeout: float = 10.0) -> Any:
        libvirt, libvirt_qemu = load_libvirt()
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        try:
            reply = libvirt_qemu.qemuAgentCommand(
                self._domain, json.dumps(message), max(1, int(timeout)), 0
            )
        except libvirt.libvirtError as exc:
            text = first_line(exc)
            if "timeout" in text.lower() or "not connected" in text.lower():
                raise TimeoutError(f"{command}: {text}") from None
            raise GuestAgentError(f"{command}: {text}") from None
        return json.loads(reply).get("return")

    def close(self) -> None:
        pass

    def __enter__(self) -> LibvirtAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
