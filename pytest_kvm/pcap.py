"""A segment's traffic as a libpcap file (``tcpdump -r``, Wireshark): written frame by
frame as the switch carries them, so memory stays flat however long the test runs.

Format: the classic libpcap file (magic 0xa1b2c3d4, microsecond timestamps, version
2.4, LINKTYPE_ETHERNET), host byte order as libpcap itself writes it. ``read_pcap``
reads such a file back (tests, and users without tcpdump).
"""

from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from .errors import KvmError

MAGIC = 0xA1B2C3D4
LINKTYPE_ETHERNET = 1
SNAPLEN = 65535
LIMIT = 64 * 1024 * 1024  # bytes per file; frames beyond it are counted, not written
_GLOBAL = struct.Struct("=IHHiIII")
_RECORD = struct.Struct("=IIII")


class PcapWriter:
    """``start`` creates the file (0600); ``write`` appends a frame; ``close`` is idempotent.
    Thread-safe: the switch writes, the test's thread flushes."""

    def __init__(self, path: Path, limit: int = LIMIT) -> None:
        self.path = path
        self.limit = limit
        self.written = 0  # frames
        self.skipped = 0  # frames past the limit
        self._size = 0
        self._file: BinaryIO | None = None
        self._lock = threading.Lock()

    def start(self) -> PcapWriter:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self._file = os.fdopen(fd, "wb")
        header = _GLOBAL.pack(MAGIC, 2, 4, 0, 0, SNAPLEN, LINKTYPE_ETHERNET)
        self._file.write(header)
        self._size = len(header)
        return self

    def write(self, frame: bytes, when: float | None = None) -> None:
        """Append ``frame`` stamped ``when`` (seconds since the epoch; now if None)."""
        stamp = time.time() if when is None else when
        data = frame[:SNAPLEN]
        with self._lock:
            if self._file is None:
                return
            if self._size + _RECORD.size + len(data) > self.limit:
                self.skipped += 1
                return
            seconds = int(stamp)
            micros = min(999_999, int((stamp - seconds) * 1_000_000))
            self._file.write(_RECORD.pack(seconds, micros, len(data), len(frame)))
            self._file.write(data)
            self._size += _RECORD.size + len(data)
            self.written += 1

    def flush(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def read_pcap(path: Path) -> Iterator[tuple[float, bytes]]:
    """``(timestamp, frame)`` for each record of a classic libpcap file of Ethernet frames."""
    data = Path(path).read_bytes()
    if len(data) < _GLOBAL.size:
        raise KvmError(f"{path}: not a pcap file (only {len(data)} bytes)")
    magic = struct.unpack_from("<I", data)[0]
    order = {MAGIC: "<", 0xD4C3B2A1: ">"}.get(magic)
    if order is None:
        raise KvmError(f"{path}: not a classic pcap file (magic {magic:#010x})")
    head = struct.Struct(order + "IHHiIII").unpack_from(data)
    if head[6] != LINKTYPE_ETHERNET:
        raise KvmError(f"{path}: link type {head[6]}, not Ethernet (1)")
    record = struct.Struct(order + "IIII")
    offset = _GLOBAL.size
    while offset + record.size <= len(data):
        seconds, micros, length, _ = record.unpack_from(data, offset)
        offset += record.size
        if offset + length > len(data):
            raise KvmError(f"{path}: truncated record at byte {offset - record.size}")
        yield seconds + micros / 1e6, data[offset : offset + length]
        offset += length
