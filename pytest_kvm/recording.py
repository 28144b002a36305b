"""``--kvm-record``: a failed test's screen, as an animated PNG.

For each guest with a display, a ``Recorder`` thread takes a screenshot about once a
second from the moment the guest is handed to the test until the test's call is
reported (before teardown). A frame is kept only when the screen changed (its PNG's
hash), with the time it was taken, in the guest's private workdir, and only the newest
``MAX_FRAMES`` frames / ``MAX_BYTES`` bytes are kept. When the test failed the frames
become ``screen-recording.png`` (an APNG: browsers and most viewers play it; readers
that do not know APNG show its first frame) and ``screen-recording.txt`` (the frames'
times) in the guest's artifacts folder, attached to the pytest-html report after the
screenshot. A passed test keeps nothing; a guest without a display records nothing.

The APNG is assembled from the frames' own compressed image data (their IDAT chunks
become fdAT chunks): nothing is decoded or re-compressed, so encoding costs about as
much as copying the files.
"""

from __future__ import annotations

import base64
import hashlib
import shutil
import struct
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .artifacts import folder_for, html_enabled
from .display import PNG_MAGIC, ppm_to_png

if TYPE_CHECKING:
    from .guest import Guest

INTERVAL = 1.0  # seconds between screenshots
MAX_FRAMES = 300  # per guest: the newest are kept
MAX_BYTES = 64 * 1024 * 1024  # per guest, on disk
LAST_FRAME_DELAY = 2.0  # seconds the last frame is shown before the loop restarts
RECORDING = "screen-recording.png"
INDEX = "screen-recording.txt"
NO_DISPLAY = "none: the guest has no display (display=True or --kvm-vnc gives it one)"


@dataclass(frozen=True)
class Frame:
    path: Path
    at: float  # seconds since the recording started
    size: int


class Frames:
    """Screens that differ from the one before, as files in ``folder``, bounded: when
    there are more than ``max_frames`` or they take more than ``max_bytes``, the oldest
    go (the end of a test is what explains its failure); the newest always stays."""

    def __init__(self, folder: Path, max_frames: int = MAX_FRAMES, max_bytes: int = MAX_BYTES):
        self.folder = folder
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self.kept: list[Frame] = []
        self.dropped = 0  # frames dropped for the caps
        self.seen = 0  # screenshots offered
        self._last = b""
        self._number = 0
        self._bytes = 0

    def offer(
        self, screen: bytes, at: float, to_png: Callable[[bytes], bytes] | None = None
    ) -> bool:
        """Keep ``screen`` taken at ``at`` if it changed; True if it was kept. The hash
        is of ``screen`` as given; ``to_png`` converts a kept one (a PPM)."""
        self.seen += 1
        digest = hashlib.sha256(screen).digest()
        if digest == self._last:
            return False
        png = to_png(screen) if to_png is not None else screen
        self._number += 1
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.folder / f"frame-{self._number:05d}.png"
        path.write_bytes(png)
        self._last = digest  # only once it is kept: a failed write is tried again
        self.kept.append(Frame(path, at, len(png)))
        self._bytes += len(png)
        while len(self.kept) > 1 and (
            len(self.kept) > self.max_frames or self._bytes > self.max_bytes
        ):
            old = self.kept.pop(0)
            old.path.unlink(missing_ok=True)
            self._bytes -= old.size
            self.dropped += 1
        return True

    @property
    def total_bytes(self) -> int:
        return self._bytes


class Recorder:
    """One guest's recording: ``grab()`` returns the screen as PNG (or PPM) bytes.
    The constructor records; ``start()`` starts the thread; ``stop()`` and ``close()``
    (which also deletes the frames) are idempotent."""

    def __init__(
        self,
        name: str,
        grab: Callable[[], bytes],
        folder: Path,
        *,
        interval: float = INTERVAL,
        max_frames: int = MAX_FRAMES,
        max_bytes: int = MAX_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.frames = Frames(folder, max_frames, max_bytes)
        self.interval = interval
        self.errors = 0
        self.last_error = ""
        self.duration = 0.0
        self._grab = grab
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0

    def start(self) -> None:
        self._started = self._clock()
        self._thread = threading.Thread(
            target=self._run, name=f"pytest-kvm-record-{self.name}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        while True:
            began = self._clock()
            self.shoot()
            if self._stop.wait(max(0.0, self.interval - (self._clock() - began))):
                return

    def shoot(self) -> None:
        """One screenshot, kept if the screen changed; a failing one is counted."""
        at = self._clock() - self._started
        try:
            data = self._grab()
            self.frames.offer(data, at, None if data.startswith(PNG_MAGIC) else ppm_to_png)
        except Exception as exc:  # a stopped guest, a QMP timeout: the test goes on
            self.errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"

    def stop(self) -> None:
        if self._thread is None or self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(self.interval + 60)  # a screendump times out after 30 s
        self.duration = self._clock() - self._started

    def save(self, folder: Path) -> Path | None:
        """The frames as ``folder/screen-recording.png`` and their times as
        ``screen-recording.txt``; None when there is no frame."""
        self.stop()
        kept = self.frames.kept
        if not kept:
            return None
        folder.mkdir(parents=True, exist_ok=True)
        ends = [f.at for f in kept[1:]] + [max(self.duration, kept[-1].at + LAST_FRAME_DELAY)]
        delays = [max(0.01, end - f.at) for f, end in zip(kept, ends, strict=True)]
        pngs = [f.path.read_bytes() for f in kept]
        data, used = encode_apng(pngs, delays)
        dest = folder / RECORDING
        dest.write_bytes(data)
        (folder / INDEX).write_text(self.summary(used) + "".join(
            f"{f.at:9.2f} s  {f.path.name}\n" for f in kept
        ))  # fmt: skip
        return dest

    def summary(self, used: int | None = None) -> str:
        kept = len(self.frames.kept)
        text = f"{kept} distinct screens of {self.frames.seen} taken over {self.duration:.1f} s"
        if used is not None and used != kept:
            text += f"; {kept - used} of another size or format left out"
        if self.frames.dropped:
            text += f"; the oldest {self.frames.dropped} dropped (limit {self.frames.max_frames}"
            text += f" frames, {self.frames.max_bytes} bytes)"
        if self.errors:
            text += f"; {self.errors} screenshots failed, the last: {self.last_error}"
        return text + "\n"

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.frames.folder, ignore_errors=True)


# -- APNG ---------------------------------------------------------------------------


def _chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data) of each chunk of a PNG; ValueError if it is not one."""
    if not png.startswith(PNG_MAGIC):
        raise ValueError("not a PNG")
    found: list[tuple[bytes, bytes]] = []
    pos = len(PNG_MAGIC)
    while pos + 8 <= len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        kind = png[pos + 4 : pos + 8]
        data = png[pos + 8 : pos + 8 + length]
        if len(data) != length:
            raise ValueError("truncated PNG")
        found.append((kind, data))
        pos += 12 + length
        if kind == b"IEND":
            break
    return found


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _delay(seconds: float) -> tuple[int, int]:
    """fcTL's delay fraction: milliseconds, at most 65.535 s."""
    return min(65535, max(1, round(seconds * 1000))), 1000


def encode_apng(pngs: Sequence[bytes], delays: Sequence[float]) -> tuple[bytes, int]:
    """An animated PNG of ``pngs``, frame i shown ``delays[i]`` seconds, looping; and
    how many frames it holds. The canvas is the last frame's size and format: earlier
    frames of another format or larger are left out, and so are those before the first
    one of the canvas's size (APNG's first frame fills the canvas)."""
    parsed = [_chunks(p) for p in pngs]
    headers = [dict(c)[b"IHDR"] for c in parsed]
    width, height = struct.unpack(">II", headers[-1][:8])
    form = headers[-1][8:]  # bit depth, colour type, compression, filter, interlace
    palette = dict(parsed[-1]).get(b"PLTE")
    chosen: list[int] = []
    for i, (chunks, header) in enumerate(zip(parsed, headers, strict=True)):
        w, h = struct.unpack(">II", header[:8])
        fits = header[8:] == form and w <= width and h <= height
        if fits and dict(chunks).get(b"PLTE") == palette and (chosen or (w, h) == (width, height)):
            chosen.append(i)
    out = [PNG_MAGIC, _chunk(b"IHDR", headers[-1])]
    out.append(_chunk(b"acTL", struct.pack(">II", len(chosen), 0)))
    if palette is not None:
        out.append(_chunk(b"PLTE", palette))
    seq = 0
    for n, i in enumerate(chosen):
        w, h = struct.unpack(">II", headers[i][:8])
        num, den = _delay(delays[i])
        control = struct.pack(">IIIIIHHBB", seq, w, h, 0, 0, num, den, 0, 0)
        out.append(_chunk(b"fcTL", control))
        seq += 1
        for kind, data in parsed[i]:
            if kind != b"IDAT":
                continue
            if n == 0:
                out.append(_chunk(b"IDAT", data))
            else:
                out.append(_chunk(b"fdAT", struct.pack(">I", seq) + data))
                seq += 1
    out.append(_chunk(b"IEND", b""))
    return b"".join(out), len(chosen)


def apng_frames(data: bytes) -> int:
    """The number of frames an APNG says it has (acTL); 1 for a plain PNG."""
    for kind, body in _chunks(data):
        if kind == b"acTL":
            return int(struct.unpack(">I", body[:4])[0])
    return 1


# -- per test -----------------------------------------------------------------------


class Recordings:
    """The recorders of one test's guests (``--kvm-record``)."""

    def __init__(self) -> None:
        self.recorders: dict[str, Recorder] = {}
        self.without_display: list[str] = []

    def add(self, guest: Guest) -> None:
        """Start recording a guest that was just handed to the test."""
        machine = guest.machine
        if not guest.has_display or machine is None or guest.workdir is None:
            self.without_display.append(guest.name)
            return
        recorder = Recorder(guest.name, machine.screenshot, guest.workdir / "recording")
        self.recorders[guest.name] = recorder
        recorder.start()

    def stop(self) -> None:
        for recorder in self.recorders.values():
            recorder.stop()

    def keep(self, item: pytest.Item, report: Any, artifacts: Path) -> None:
        """A failed test: each recording into its guest's artifacts folder, a report
        section and (with pytest-html) an extra each."""
        extras: list[Any] = []
        for name, recorder in self.recorders.items():
            try:
                dest = recorder.save(folder_for(artifacts, item.nodeid, name))
            except (OSError, ValueError, KeyError, struct.error) as exc:
                report.sections.append((f"kvm recording: {name}", f"not saved: {exc}"))
                continue
            text = f"{dest} ({recorder.summary().strip()})" if dest else recorder.summary()
            report.sections.append((f"kvm recording: {name}", text.strip()))
            if dest is not None and html_enabled(item.config):
                from pytest_html import extras as html

                encoded = base64.b64encode(dest.read_bytes()).decode()
                extras.append(html.png(encoded, f"{name}: screen recording"))
        for name in self.without_display:
            report.sections.append((f"kvm recording: {name}", NO_DISPLAY))
        if extras:
            report.extras = [*getattr(report, "extras", []), *extras]

    def close(self) -> None:
        for recorder in self.recorders.values():
            recorder.close()


recordings_key = pytest.StashKey["Recordings | None"]()


def stop(item: pytest.Item) -> None:
    """Before a test's artifacts are read, and before its teardown: no more frames."""
    recordings = item.stash.get(recordings_key, None)
    if recordings is not None:
        recordings.stop()


def keep(item: pytest.Item, report: Any, artifacts: Path | None) -> None:
    recordings = item.stash.get(recordings_key, None)
    if recordings is not None and artifacts is not None:
        recordings.keep(item, report, artifacts)
