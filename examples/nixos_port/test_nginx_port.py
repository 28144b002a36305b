"""nixpkgs' ``nixos/tests/nginx.nix`` testScript, ported to pytest-kvm on Debian 12.

The NixOS test switches the web server between "specialisations" (whole system
configurations); on Debian the same steps are configuration files put in place and
``systemctl reload``/``restart``. Each ``with subtest(...)`` is a pytest subtest, and
``webserver.X(...)`` is ``webserver.X(...)``: the guest has the NixOS driver's names.
``http_get`` asks with the guest's curl, as the NixOS test does.
"""

from __future__ import annotations

import re
import shlex
import time
from pathlib import Path

import pytest

FILES = Path(__file__).resolve().parent / "files"
URL = "http://localhost/index.html"


def http_get(guest, url: str, *headers: str) -> tuple[int, str]:
    """The status and the ETag of a GET in the guest (304 is an answer too)."""
    argv = ["curl", "-sS", "-o", "/dev/null", "-D", "-", url]
    for header in headers:
        argv += ["-H", header]
    response = guest.succeed(shlex.join(argv)).replace("\r", "")
    status = int(response.split(None, 2)[1])  # "HTTP/1.1 200 OK"
    etag = re.search(r"^etag:[ \t]*(.*)$", response, re.I | re.M)
    return status, etag.group(1).strip() if etag else ""


def check_etag(webserver) -> str:
    status, etag = http_get(webserver, URL)
    assert status == 200 and etag
    again, _ = http_get(webserver, URL, f"If-None-Match: {etag}")
    assert again == 304
    return etag


class NginxJournal:
    """``journalctl -u nginx`` from the test's start on (the snapshot's own setup
    restarted nginx: its entries are not this test's)."""

    def __init__(self, guest) -> None:
        self.guest = guest
        out = guest.succeed("journalctl -n 1 -o cat --show-cursor")
        self.cursor = out.rsplit("-- cursor: ", 1)[-1].strip()

    def grep(self, word: str) -> str:
        cursor = shlex.quote(f"--after-cursor={self.cursor}")
        return f"journalctl -u nginx {cursor} --no-pager | grep -q -i {shlex.quote(word)}"


@pytest.mark.kvm(image="debian-12")  # the host's packages are Debian 12's
def test_nginx(kvm_guest_factory, webserver_image, subtests):
    webserver = kvm_guest_factory(image=webserver_image)
    journal = NginxJournal(webserver)

    webserver.wait_for_unit("nginx")
    webserver.wait_for_open_port(80)

    with subtests.test("check ETag when the content changes"):
        old_etag = check_etag(webserver)
        webserver.succeed("echo content changed > /srv/www/index.html")
        time.sleep(1)
        new_etag = check_etag(webserver)
        assert old_etag != new_etag

    with subtests.test("config is reloaded, not restarted"):
        webserver.copy_from_host(FILES / "reload.conf", "/etc/nginx/sites-enabled/1.my.test")
        webserver.succeed("systemctl reload nginx")
        webserver.wait_for_open_port(8080)
        webserver.fail(journal.grep("stopped"))
        webserver.succeed(journal.grep("reloaded"))

    with subtests.test("restart (Debian's stand-in for a new nginx package)"):
        webserver.succeed("systemctl restart nginx")
        webserver.wait_for_unit("nginx")
        webserver.succeed(journal.grep("stopped"))

    with subtests.test("a reload fails on configuration errors, nginx stays up"):
        webserver.copy_from_host(FILES / "broken.conf", "/etc/nginx/sites-enabled/broken")
        webserver.fail("systemctl reload nginx")
        webserver.succeed('[ "$(systemctl is-active nginx)" = active ]')
        # The same again: the error is not reported only once.
        webserver.fail("systemctl reload nginx")
        webserver.wait_until_fails("nginx -t")
