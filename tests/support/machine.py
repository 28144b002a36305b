"""One fake ``Machine``: the backend contract with nothing behind it, for tests of what
sits above a backend (``Guest``, artifacts) without QEMU."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_kvm.backends.base import Machine, MachineSpec
from tests.support.specs import spec as default_spec

if TYPE_CHECKING:
    from pytest_kvm.qga import AgentCalls


class FakeMachine(Machine):
    """A machine that runs nothing. ``running`` is what ``is_running`` says (set it to
    False to play a QEMU that died, whose ``exit_code`` is then ``exit_status``);
    ``qmp`` answers from ``answers`` (command -> return value) and records ``calls``;
    ``screen`` is what ``screenshot`` returns."""

    def __init__(
        self,
        events: Iterable[dict[str, Any]] = (),
        *,
        spec: MachineSpec | None = None,
        argv: list[str] | None = None,
        running: bool = True,
        exit_status: int = -9,
        answers: dict[str, Any] | None = None,
        screen: bytes = b"",
    ) -> None:
        self.spec = spec or default_spec(Path("/nonexistent/fake-machine"))
        self._events = list(events)
        self._argv = argv if argv is not None else ["qemu-system-x86_64", "-name", "guest=kvm-1"]
        self.running = running
        self.exit_status = exit_status
        self.answers = dict(answers or {})
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.screen = screen
        self.closed = False

    def start(self) -> None:
        self.running = True

    def is_running(self) -> bool:
        return self.running

    def exit_code(self) -> int | None:
        return None if self.running else self.exit_status

    def qmp(self, command: str, **args: Any) -> Any:
        if not self.running:
            raise ConnectionError("the fake machine is not running")
        self.calls.append((command, args))
        return self.answers.get(command, {})

    def wait_for_exit(self, timeout: float) -> bool:
        return not self.running

    def shutdown(self, timeout: float = 30.0) -> None:
        self.running = False

    def kill(self) -> None:
        self.running = False

    def close(self) -> None:
        self.running = False
        self.closed = True

    @property
    def argv(self) -> list[str]:
        return self._argv

    @property
    def events(self) -> list[dict[str, Any]]:
        return self._events

    def agent(self) -> AgentCalls:
        raise ConnectionError("the fake machine has no guest agent")

    def screenshot(self) -> bytes:
        return self.screen
