"""A guest's SSH connection: open it (with progress lines on a long boot), reopen it,
and turn what goes wrong into GuestErrors that say what was waited for."""

from __future__ import annotations

import time
from collections.abc import Callable

import paramiko

from ..errors import GuestCrashed, GuestError, GuestTimeout
from ..progress import WAIT_PROGRESS_EVERY, waiting_line
from ..ssh import JumpFailed, KeyPair, SshJump, SshSession
from .state import GuestState


class Connection:
    """The SSH session of one guest, made on ``state``'s address and port."""

    def __init__(
        self,
        state: GuestState,
        user: str,
        client_key: KeyPair,
        jump: SshJump | None,
        boot_timeout: float,
        progress: Callable[[str], None],
    ) -> None:
        self._state = state
        self._user = user
        self._client_key = client_key
        self._jump = jump
        self._boot_timeout = boot_timeout
        self._progress = progress
        self.host_key: KeyPair | None = None  # pinned: the seed's, or the template's
        self.session: SshSession | None = None

    def current(self) -> SshSession:
        """The open session; GuestError if the guest has none (ssh=False)."""
        if self.session is None:
            raise GuestError(
                f"{self._state.what}: no SSH connection (started with ssh=False?)",
                self._state.name,
            )
        return self.session

    def close(self) -> None:
        if self.session is not None:
            self.session.close()

    def drop(self) -> None:
        """Close the session and forget it (a guest whose state is being saved)."""
        if self.session is not None:
            self.session.close()
            self.session = None

    def reconnect(self, timeout: float, lost: str | None = None) -> None:
        """A new SSH connection within ``timeout`` s; ``lost``: the command that found
        the old one gone (the error then says so)."""
        self.current().close()
        dead = self._state.alive()
        if dead:
            raise GuestCrashed(f"{dead}; console:\n{self._state.crash_lines()}", self._state.name)
        self.connect(time.monotonic() + timeout, waited=timeout, again=True, lost=lost)

    def connect(
        self,
        deadline: float,
        *,
        waited: float | None = None,
        again: bool = False,
        lost: str | None = None,
        progress_since: float | None = None,
    ) -> None:
        """SSH until ``deadline``. The timeout error says what was waited for and how
        long (``waited``, default the boot timeout): the boot, SSH ``again`` after a
        reconnect, or the command ``lost`` that found its connection gone. With
        ``progress_since`` (a real boot's power-on), a long wait prints a line now and
        then: what it waits for, the last console line and the time since."""
        assert self.host_key is not None
        state = self._state
        session = SshSession(state.address, state.port, self._user,
                             self._client_key, self.host_key, self._jump)  # fmt: skip
        next_line = (progress_since or 0.0) + WAIT_PROGRESS_EVERY

        def alive_and_progress() -> str:  # called between connection attempts
            nonlocal next_line
            now = time.monotonic()
            if progress_since is not None and now >= next_line:
                next_line = now + WAIT_PROGRESS_EVERY
                self._progress(
                    waiting_line(state.name, "SSH", state.log_path, now - progress_since)
                )
            return state.alive()

        try:
            session.connect(deadline, alive=alive_and_progress)
        except ConnectionAbortedError as exc:
            raise GuestCrashed(f"{exc}; console:\n{state.crash_lines()}", state.name) from None
        except GuestTimeout as exc:
            raise self._timeout(exc, waited, again, lost) from None
        except JumpFailed as exc:
            raise GuestError(f"{state.what}: {exc}", state.name) from None
        except paramiko.BadHostKeyException as exc:
            raise GuestError(
                f"{state.what}: the host on {state.address}:{state.port} offered host key "
                f"{exc.key.get_fingerprint().hex()}, not the one pinned for this guest; "
                "refusing to connect",
                state.name,
            ) from None
        self.session = session

    def _timeout(
        self, exc: GuestTimeout, waited: float | None, again: bool, lost: str | None
    ) -> GuestTimeout:
        limit = self._boot_timeout if waited is None else waited
        if lost is not None:
            what = (
                f"command {lost!r}: the SSH connection was lost and SSH did not answer "
                f"again within {limit:.0f} s"
            )
        elif again:
            what = f"SSH did not answer again within {limit:.0f} s"
        else:
            what = f"not SSH-ready after {limit:.0f} s"
        hint = "; the console is still reachable as guest.console" if again or lost else ""
        return GuestTimeout(
            f"{self._state.what}: {what} ({exc}){hint}; "
            f"last console lines:\n{self._state.console_tail(20)}",
            self._state.name,
        )
