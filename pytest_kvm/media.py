"""Install media and answer files: what an installer guest boots and reads.

``check_install_media`` refuses, before anything starts, a CD image that does not
exist, is not ISO 9660, or has no El Torito boot record (the firmware would fall
through to the blank disk and a test would wait for nothing). ``AnswerServer``
serves preseed / autoinstall / kickstart files over HTTP on 127.0.0.1 for one test:
a guest on user networking reaches it at the host address it sees (10.0.2.2).
"""

from __future__ import annotations

import hmac
import http.server
import secrets
import threading
import urllib.parse
from collections.abc import Mapping
from pathlib import Path

import pycdlib
from pycdlib.pycdlibexception import PyCdlibException

from .errors import KvmConfigError
from .network import USER_NET_HOST


def check_install_media(path: Path, what: str = "cdrom") -> None:
    """A clear KvmConfigError unless ``path`` is a bootable ISO 9660 image."""
    if not path.exists():
        raise KvmConfigError(f"{what}={str(path)!r} does not exist")
    if not path.is_file():
        raise KvmConfigError(f"{what}={str(path)!r} is not a file")
    iso = pycdlib.PyCdlib()
    try:
        iso.open(str(path))
    except (PyCdlibException, OSError) as exc:
        raise KvmConfigError(
            f"{what}={str(path)!r} is not an ISO 9660 image ({str(exc).splitlines()[0]})"
        ) from None
    try:
        bootable = iso.eltorito_boot_catalog is not None
    finally:
        iso.close()
    if not bootable:
        raise KvmConfigError(
            f"{what}={str(path)!r} is not bootable: it has no El Torito boot record "
            "(make it with xorriso -b ... / grub-mkrescue, or attach it with boot='disk')"
        )


def check_boot_file(path: Path, what: str) -> Path:
    """An existing, non-empty kernel or initrd for a direct boot."""
    if not path.is_file():
        raise KvmConfigError(f"{what}={str(path)!r} does not exist")
    if path.stat().st_size == 0:
        raise KvmConfigError(f"{what}={str(path)!r} is empty")
    return path.resolve()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        self._answer(with_body=True)

    def do_HEAD(self) -> None:
        self._answer(with_body=False)

    def _answer(self, with_body: bool) -> None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        token, _, name = path.partition("/")
        body = None
        if hmac.compare_digest(token.encode(), self.server.token.encode()):
            body = self.server.files.get(name)
        else:
            name = path  # logged as asked for; the token never is
        self.server.log.append((self.command, "/" + name, 200 if body is not None else 404))
        if body is None:
            self.send_error(404, f"not served: /{name}")
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # requests are kept in AnswerServer.requests


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    files: dict[str, bytes]
    log: list[tuple[str, str, int]]
    token: str


class AnswerServer:
    """Files for installers over HTTP, on 127.0.0.1 only, for one test's lifetime.

    ``serve(name, content)`` returns the URL a guest on user networking uses;
    ``requests`` lists what was asked for (method, path, status), so a test can
    check that its installer really read its answers.

    Every URL's path starts with a random token of this server (answer files may
    hold passwords, and anything on the host or in a guest can reach the port): a
    request without it gets 404. Files served together share it, so an installer
    can still find one beside another by a relative path."""

    def __init__(self, guest_host: str = USER_NET_HOST) -> None:
        self.guest_host = guest_host
        self._files: dict[str, bytes] = {}
        self._log: list[tuple[str, str, int]] = []
        self._token = secrets.token_urlsafe(24)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> AnswerServer:
        if self._server is not None:
            return self
        server = _Server(("127.0.0.1", 0), _Handler)
        server.files = self._files
        server.log = self._log
        server.token = self._token
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2},
            name="kvm-answer-server", daemon=True,
        )  # fmt: skip
        self._thread.start()
        return self

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the answer server is not running")
        return int(self._server.server_address[1])

    def serve(self, name: str, content: str | bytes | Path) -> str:
        """Serve ``content`` (text, bytes, or a local file read now) at ``/name``."""
        clean = name.strip("/")
        parts = clean.split("/")
        if not clean or any(part in ("", ".", "..") for part in parts):
            raise KvmConfigError(f"kvm_http.serve: {name!r} is not a plain relative path")
        if isinstance(content, Path):
            try:
                data = content.read_bytes()
            except OSError as exc:
                raise KvmConfigError(
                    f"kvm_http.serve: cannot read {str(content)!r}: {exc}"
                ) from None
        elif isinstance(content, str):
            data = content.encode()
        elif isinstance(content, bytes):
            data = content
        else:
            raise KvmConfigError(f"kvm_http.serve: content of {name!r} must be str, bytes or Path")
        self.start()
        self._files[clean] = data
        return self.url(clean)

    def serve_all(self, files: Mapping[str, str | bytes | Path]) -> dict[str, str]:
        return {name: self.serve(name, content) for name, content in files.items()}

    def url(self, name: str = "") -> str:
        """The URL of ``name`` as the guest sees it (with this server's token)."""
        path = urllib.parse.quote(name.strip("/"))
        return f"http://{self.guest_host}:{self.port}/{self._token}/{path}"

    @property
    def local_url(self) -> str:
        """The base URL on this host (127.0.0.1), with this server's token."""
        return f"http://127.0.0.1:{self.port}/{self._token}/"

    @property
    def requests(self) -> list[tuple[str, str, int]]:
        return list(self._log)

    def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        try:
            server.shutdown()
        finally:
            server.server_close()
            if self._thread is not None:
                self._thread.join(5)

    def __enter__(self) -> AnswerServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
