"""The NixOS driver's names on one restored guest (with a display, for the keyboard):
each used once the way a ported NixOS testScript would."""

from __future__ import annotations

import shlex

import pytest


@pytest.mark.kvm(vnc=True)
def test_nixos_names_on_a_real_guest(kvm_guest, tmp_path):
    g = kvm_guest
    # copy_from_host: a directory whole, names with a space and a quote.
    site = tmp_path / "site"
    (site / "sub dir").mkdir(parents=True)
    (site / "index.html").write_text("top\n")
    (site / "sub dir" / "it's.txt").write_text("copied\n")
    g.copy_from_host(site, "/srv/the site")
    assert g.succeed(shlex.join(["cat", "/srv/the site/sub dir/it's.txt"])) == "copied\n"
    assert g.succeed("cat '/srv/the site/index.html'") == "top\n"
    # wait_for_file: a file that appears a little later (its path quoted).
    g.succeed("nohup sh -c 'sleep 2; touch \"/tmp/a later file\"' >/dev/null 2>&1 </dev/null &")
    g.wait_for_file("/tmp/a later file", timeout=60)
    # wait_for_open_port, then wait_until_fails once the listener is gone.
    g.succeed(
        "nohup python3 -m http.server 8080 >/dev/null 2>&1 </dev/null & echo $! >/tmp/http.pid"
    )
    g.wait_for_open_port(8080, timeout=60)
    g.succeed("kill $(cat /tmp/http.pid)")
    g.wait_until_fails("ss -Htln 'sport = :8080' | grep -q .", timeout=60)
    # send_chars: typed on the keyboard, read from tty1 (its getty stopped first).
    g.succeed(
        "systemctl stop getty@tty1; "
        "nohup sh -c 'cat /dev/tty1 >/tmp/typed' >/dev/null 2>&1 </dev/null &"
    )
    g.wait_until_succeeds("pgrep -x cat", timeout=30)
    g.send_chars("typed by kvm\n")
    g.wait_until_succeeds("grep -q 'typed by kvm' /tmp/typed", timeout=60)
    # get_screen_text: this guest's console is a framebuffer (bochs-drm), so VGA text
    # mode has nothing to read; the name answers like screen_text() (by OCR: see
    # test_screen_ocr.py).
    assert isinstance(g.get_screen_text(), str)
