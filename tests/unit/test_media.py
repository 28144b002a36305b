"""Install media checks and the answer-file server, without guests."""

import io
import urllib.error
import urllib.request

import pycdlib
import pytest

from pytest_kvm.errors import KvmConfigError
from pytest_kvm.media import AnswerServer, check_boot_file, check_install_media


def _iso(path, bootable: bool):
    iso = pycdlib.PyCdlib()
    iso.new()
    iso.add_fp(io.BytesIO(b"\0" * 2048), 2048, "/BOOT.IMG;1")
    if bootable:
        iso.add_eltorito("/BOOT.IMG;1", bootcatfile="/BOOT.CAT;1", media_name="noemul")
    iso.write(str(path))
    iso.close()
    return path


def test_install_media_must_be_a_bootable_iso(tmp_path):
    check_install_media(_iso(tmp_path / "boot.iso", bootable=True))
    with pytest.raises(KvmConfigError, match="not bootable: it has no El Torito"):
        check_install_media(_iso(tmp_path / "data.iso", bootable=False))
    junk = tmp_path / "junk.iso"
    junk.write_bytes(b"x" * 100_000)
    with pytest.raises(KvmConfigError, match="is not an ISO 9660 image"):
        check_install_media(junk)
    with pytest.raises(KvmConfigError, match="does not exist"):
        check_install_media(tmp_path / "missing.iso")
    with pytest.raises(KvmConfigError, match="is not a file"):
        check_install_media(tmp_path)


def test_boot_files(tmp_path):
    (tmp_path / "linux").write_bytes(b"kernel")
    (tmp_path / "empty").write_bytes(b"")
    assert check_boot_file(tmp_path / "linux", "kernel") == (tmp_path / "linux").resolve()
    with pytest.raises(KvmConfigError, match=r"kernel='.*nope' does not exist"):
        check_boot_file(tmp_path / "nope", "kernel")
    with pytest.raises(KvmConfigError, match=r"initrd='.*empty' is empty"):
        check_boot_file(tmp_path / "empty", "initrd")


def test_answer_server_serves_on_loopback_and_logs(tmp_path):
    answers = tmp_path / "ks.cfg"
    answers.write_text("text\nreboot\n")
    with AnswerServer() as server:
        assert server._server is not None
        assert server._server.server_address[0] == "127.0.0.1"
        url = server.serve("preseed.cfg", "d-i foo string bar\n")
        token = url.split("/")[3]
        assert url == f"http://10.0.2.2:{server.port}/{token}/preseed.cfg"
        assert server.local_url == f"http://127.0.0.1:{server.port}/{token}/"
        server.serve_all({"dir/ks.cfg": answers, "raw.bin": b"\x00\x01"})
        with urllib.request.urlopen(server.local_url + "preseed.cfg", timeout=10) as r:
            assert r.read() == b"d-i foo string bar\n"
        with urllib.request.urlopen(server.local_url + "dir/ks.cfg", timeout=10) as r:
            assert r.read() == b"text\nreboot\n"
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(server.local_url + "other", timeout=10)
        assert server.requests == [
            ("GET", "/preseed.cfg", 200),
            ("GET", "/dir/ks.cfg", 200),
            ("GET", "/other", 404),
        ]
        port = server.port
    # Closed: nothing listens any more, and closing again is harmless.
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/{token}/preseed.cfg", timeout=5)
    server.close()


def test_answer_files_are_not_served_at_guessable_paths():
    with AnswerServer() as server, AnswerServer() as other:
        url = server.serve("preseed.cfg", "d-i passwd/root-password password secret\n")
        token = url.split("/")[3]
        assert len(token) >= 32 and token not in other.serve("preseed.cfg", "x")
        base = f"http://127.0.0.1:{server.port}/"
        for guess in ("preseed.cfg", "x/preseed.cfg", f"{token[:-1]}/preseed.cfg", token):
            with pytest.raises(urllib.error.HTTPError, match="404"):
                urllib.request.urlopen(base + guess, timeout=10)
        with urllib.request.urlopen(f"{base}{token}/preseed.cfg", timeout=10) as r:
            assert b"secret" in r.read()
        assert [status for _, _, status in server.requests] == [404, 404, 404, 404, 200]
        assert not any(token in path for _, path, _ in server.requests)


@pytest.mark.parametrize("name", ["", "/", "../x", "a/../b", "a//b", "./x"])
def test_answer_server_refuses_odd_names(name):
    with AnswerServer() as server, pytest.raises(KvmConfigError, match="plain relative path"):
        server.serve(name, "x")


def test_answer_server_refuses_odd_content(tmp_path):
    with AnswerServer() as server:
        with pytest.raises(KvmConfigError, match="cannot read"):
            server.serve("a", tmp_path / "missing")
        with pytest.raises(KvmConfigError, match="must be str, bytes or Path"):
            server.serve("a", 42)  # type: ignore[arg-type]
