"""--kvm-record's logic: frames kept on change and bounded, the recorder thread, and
the APNG it encodes (a valid PNG whose frames decompress to whole images)."""

from __future__ import annotations

import shutil
import struct
import subprocess
import threading
import zlib
from pathlib import Path

import pytest

from pytest_kvm.display import ppm_to_png
from pytest_kvm.recording import (
    INDEX,
    RECORDING,
    Frames,
    Recorder,
    _chunks,
    apng_frames,
    encode_apng,
)


def png(width: int, height: int, shade: int) -> bytes:
    return ppm_to_png(b"P6 %d %d 255\n" % (width, height) + bytes([shade]) * (width * height * 3))


def check_apng(data: bytes) -> list[tuple[int, int]]:
    """Every chunk's CRC, the sequence numbers in order, and each frame's data
    decompressing to a whole image of its fcTL size: (width, height) per frame."""
    pos, kinds = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        kinds.append(kind)
        pos += 12 + length
    assert kinds[0] == b"IHDR" and kinds[1] == b"acTL" and kinds[-1] == b"IEND"
    frames: list[tuple[int, int]] = []
    streams: list[bytes] = []
    seq = 0
    for kind, body in _chunks(data):
        if kind == b"fcTL":
            assert struct.unpack(">I", body[:4])[0] == seq
            seq += 1
            frames.append(struct.unpack(">II", body[4:12]))
            streams.append(b"")
        elif kind == b"IDAT":
            streams[-1] += body
        elif kind == b"fdAT":
            assert struct.unpack(">I", body[:4])[0] == seq
            seq += 1
            streams[-1] += body[4:]
    for (w, h), stream in zip(frames, streams, strict=True):
        assert len(zlib.decompress(stream)) == h * (1 + w * 3)  # RGB, a filter byte a row
    assert apng_frames(data) == len(frames)
    return frames


def test_frames_keep_only_changed_screens(tmp_path):
    frames = Frames(tmp_path / "rec")
    assert frames.offer(png(4, 4, 0), 0.0)
    assert not frames.offer(png(4, 4, 0), 1.0)
    assert frames.offer(png(4, 4, 9), 2.0)
    assert frames.offer(png(4, 4, 0), 3.0)  # back to the first screen: a change
    assert [f.at for f in frames.kept] == [0.0, 2.0, 3.0]
    assert frames.seen == 4
    assert sorted(p.name for p in (tmp_path / "rec").iterdir()) == [
        "frame-00001.png", "frame-00002.png", "frame-00003.png",
    ]  # fmt: skip
    assert (tmp_path / "rec").stat().st_mode & 0o777 == 0o700


def test_frames_drop_the_oldest_over_the_count_cap(tmp_path):
    frames = Frames(tmp_path, max_frames=3)
    for i in range(5):
        frames.offer(png(2, 2, i), float(i))
    assert [f.at for f in frames.kept] == [2.0, 3.0, 4.0]
    assert frames.dropped == 2
    assert len(list(tmp_path.iterdir())) == 3


def test_frames_drop_the_oldest_over_the_byte_cap(tmp_path):
    shots = [png(8, 8, i) for i in range(4)]
    cap = len(shots[2]) + len(shots[3])
    frames = Frames(tmp_path, max_bytes=cap)
    for i, shot in enumerate(shots):
        frames.offer(shot, float(i))
    assert [f.at for f in frames.kept] == [2.0, 3.0] and frames.total_bytes <= cap
    tiny = Frames(tmp_path / "tiny", max_bytes=1)
    tiny.offer(shots[0], 0.0)
    tiny.offer(shots[1], 1.0)
    assert [f.at for f in tiny.kept] == [1.0]  # the newest stays, whatever its size


def test_apng_is_a_png_with_every_frame(tmp_path):
    data, used = encode_apng([png(16, 8, 0), png(16, 8, 80), png(16, 8, 160)], [1, 2.5, 2])
    assert used == 3
    assert check_apng(data) == [(16, 8)] * 3
    controls = [body for kind, body in _chunks(data) if kind == b"fcTL"]
    assert [struct.unpack(">HH", c[20:24]) for c in controls] == [
        (1000, 1000), (2500, 1000), (2000, 1000),
    ]  # fmt: skip
    if shutil.which("file"):
        out = tmp_path / "r.png"
        out.write_bytes(data)
        described = subprocess.run(["file", str(out)], capture_output=True, text=True).stdout
        assert "PNG image data, 16 x 8" in described, described


def test_apng_canvas_is_the_last_frames_size():
    # A resolution change: frames before the first one of the final size are left out;
    # a smaller one after it is drawn at the corner; a larger one is left out.
    pngs = [png(8, 8, 1), png(16, 8, 2), png(4, 4, 3), png(32, 32, 4), png(16, 8, 5)]
    data, used = encode_apng(pngs, [1] * 5)
    assert used == 3
    assert check_apng(data) == [(16, 8), (4, 4), (16, 8)]


def test_a_single_frame_is_still_an_apng():
    data, used = encode_apng([png(3, 3, 7)], [2])
    assert used == 1 and check_apng(data) == [(3, 3)]


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_recorder_saves_changes_with_their_times_and_notes_failures(tmp_path):
    screens = [png(8, 8, 0), png(8, 8, 0), RuntimeError("guest gone"), png(8, 8, 50)]
    clock = FakeClock()

    def grab() -> bytes:
        item = screens.pop(0)
        clock.now += 1
        if isinstance(item, Exception):
            raise item
        return item

    recorder = Recorder("g", grab, tmp_path / "work", clock=clock)
    for _ in range(4):
        recorder.shoot()
    recorder.duration = 5.0
    dest = recorder.save(tmp_path / "artifacts")
    assert dest == tmp_path / "artifacts" / RECORDING
    assert check_apng(dest.read_bytes()) == [(8, 8), (8, 8)]
    index = (tmp_path / "artifacts" / INDEX).read_text()
    assert index.startswith("2 distinct screens of 3 taken over 5.0 s; 1 screenshots failed")
    assert "RuntimeError: guest gone" in index
    assert "frame-00002.png" in index
    recorder.close()
    assert not (tmp_path / "work").exists()


def test_recorder_thread_records_until_stopped_and_converts_ppm(tmp_path):
    shots = threading.Semaphore(0)
    count = 0

    def grab() -> bytes:
        nonlocal count
        count += 1
        shots.release()
        return b"P6 2 2 255\n" + bytes([count % 256]) * 12

    recorder = Recorder("g", grab, tmp_path / "work", interval=0.01)
    recorder.start()
    for _ in range(3):
        assert shots.acquire(timeout=30)
    recorder.stop()
    recorder.stop()  # idempotent
    seen = recorder.frames.seen
    assert seen >= 3 and len(recorder.frames.kept) == seen
    assert recorder.frames.kept[0].path.read_bytes().startswith(b"\x89PNG")
    assert recorder.save(tmp_path / "out") is not None
    recorder.close()
    recorder.close()


def test_nothing_recorded_saves_nothing(tmp_path):
    recorder = Recorder("g", lambda: b"", tmp_path / "work")
    recorder.shoot()  # b"" is not an image: counted as a failed screenshot
    assert recorder.errors == 1
    assert recorder.save(tmp_path / "out") is None
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad", [b"", b"GIF89a", b"\x89PNG\r\n\x1a\n\x00\x00\x00\x10IHDR"])
def test_chunks_refuse_what_is_not_a_png(bad: bytes):
    with pytest.raises(ValueError):
        _chunks(bad)


def test_frames_folder_is_created_lazily(tmp_path: Path):
    frames = Frames(tmp_path / "never")
    assert not (tmp_path / "never").exists()
    assert frames.kept == []


class FakeGuest:
    def __init__(self, name: str, workdir: Path, display: bool) -> None:
        self.name = name
        self.workdir = workdir
        self.has_display = display
        self.machine = self
        self.shade = 0

    def screenshot(self) -> bytes:
        self.shade += 1
        return png(4, 4, self.shade)


class FakeConfig:
    class pluginmanager:
        @staticmethod
        def hasplugin(name: str) -> bool:
            return False


class FakeItem:
    nodeid = "t.py::test_x"
    config = FakeConfig()


class FakeReport:
    def __init__(self) -> None:
        self.sections: list[tuple[str, str]] = []


def test_recordings_keep_a_display_guests_frames_and_note_the_other(tmp_path):
    from pytest_kvm.recording import NO_DISPLAY, Recordings

    recordings = Recordings()
    shown = FakeGuest("shown", tmp_path / "w1", display=True)
    recordings.add(shown)
    recordings.add(FakeGuest("blind", tmp_path / "w2", display=False))
    recordings.stop()  # the thread took at least its first screenshot
    recordings.recorders["shown"].shoot()  # one more, changed
    report = FakeReport()
    recordings.keep(FakeItem(), report, tmp_path / "artifacts")  # type: ignore[arg-type]
    titles = dict(report.sections)
    assert RECORDING in titles["kvm recording: shown"]
    assert titles["kvm recording: blind"] == NO_DISPLAY
    saved = list((tmp_path / "artifacts").rglob(RECORDING))
    assert len(saved) == 1 and apng_frames(saved[0].read_bytes()) >= 2
    recordings.close()
    assert not (tmp_path / "w1" / "recording").exists()
