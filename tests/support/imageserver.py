"""A local HTTP server for download tests: 127.0.0.1 only, Range requests, and faults
on demand (drop the connection after N bytes, serve slowly), with a log of what it saw."""

from __future__ import annotations

import hashlib
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class Seen:
    path: str
    range: str | None
    if_range: str | None
    status: int
    sent: int = 0


@dataclass
class ImageServer:
    files: dict[str, bytes | Path] = field(default_factory=dict)  # a Path: served from disk
    seen: list[Seen] = field(default_factory=list)
    # path -> byte counts: the next responses for the path stop after that many bytes
    drops: dict[str, list[int]] = field(default_factory=dict)
    delay: float = 0.0  # seconds per 64 KiB sent
    redirects: dict[str, str] = field(default_factory=dict)  # path -> Location (302)
    tls: ssl.SSLContext | None = None  # serve https with this server context
    lock: threading.Lock = field(default_factory=threading.Lock)
    httpd: ThreadingHTTPServer | None = None

    @property
    def port(self) -> int:
        assert self.httpd is not None
        return int(self.httpd.server_address[1])

    def url(self, path: str) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def requests(self, path: str) -> list[Seen]:
        with self.lock:
            return [s for s in self.seen if s.path == "/" + path.lstrip("/")]

    def sent(self, path: str) -> int:
        return sum(s.sent for s in self.requests(path))

    def start(self) -> ImageServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                server._get(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if self.tls is not None:
            self.httpd.socket = self.tls.wrap_socket(self.httpd.socket, server_side=True)
        self.httpd.daemon_threads = True
        threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        ).start()
        return self

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()

    def _get(self, h: BaseHTTPRequestHandler) -> None:
        path = h.path.split("?", 1)[0]
        data = self.files.get(path)
        rng, if_range = h.headers.get("Range"), h.headers.get("If-Range")
        if path in self.redirects:
            with self.lock:
                self.seen.append(Seen(path, rng, if_range, 302))
            h.send_response(302)
            h.send_header("Location", self.redirects[path])
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        if data is None:
            with self.lock:
                self.seen.append(Seen(path, rng, if_range, 404))
            h.send_error(404)
            return
        if isinstance(data, Path):
            st = data.stat()
            size, etag = st.st_size, f'"{st.st_ino:x}-{st.st_mtime_ns:x}"'
        else:
            size, etag = len(data), '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
        start = 0
        if rng and rng.startswith("bytes=") and (if_range is None or if_range == etag):
            start = int(rng[6:].split("-", 1)[0])
        if start > size:
            with self.lock:
                self.seen.append(Seen(path, rng, if_range, 416))
            h.send_error(416)
            return
        status = 206 if start else 200
        with self.lock:
            record = Seen(path, rng, if_range, status)
            self.seen.append(record)
            drops = self.drops.get(path)
            limit = drops.pop(0) if drops else None
        h.send_response(status)
        h.send_header("Content-Length", str(size - start))
        h.send_header("ETag", etag)
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        h.end_headers()
        end = size if limit is None else min(size, start + limit)
        try:
            for i in range(start, end, 1 << 20 if isinstance(data, Path) else 65536):
                piece = _slice(
                    data, i, min(end, i + (1 << 20 if isinstance(data, Path) else 65536))
                )
                h.wfile.write(piece)
                with self.lock:
                    record.sent += len(piece)
                if self.delay:
                    time.sleep(self.delay)
            h.wfile.flush()
        except OSError:
            pass
        h.close_connection = True


def _slice(data: bytes | Path, start: int, end: int) -> bytes:
    if isinstance(data, bytes):
        return data[start:end]
    with data.open("rb") as f:
        f.seek(start)
        return f.read(end - start)


def tls_context(directory: Path) -> tuple[ssl.SSLContext, Path]:
    """A server context with a throwaway self-signed certificate for 127.0.0.1, and
    the certificate (for a client's SSL_CERT_FILE)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context, cert
