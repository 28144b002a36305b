"""The web server of the NixOS nginx test, prepared once as a ``kvm_snapshot``.

The catalog image has no nginx and its guests reach no mirror, so the packages are
fetched on the host with the host's apt (``pytest_kvm.hostdebs``; once, cached under
``<kvm cache>/debs/nginx``) and installed from a copy in the guest. The snapshot is
rebuilt only when ``setup``'s source or a file in ``files/`` changes; every test
restores it in about a second."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_kvm.hostdebs import fetch_debs, install_debs
from pytest_kvm.plugin import settings_key

FILES = Path(__file__).resolve().parent / "files"
SITE_FILES = [FILES / "ceeformat.conf", FILES / "sites.conf", FILES / "www" / "index.html"]


@pytest.fixture(scope="session")
def webserver_image(kvm_snapshot, request):
    repo = fetch_debs(["nginx"], request.config.stash[settings_key].cache / "debs" / "nginx")

    def setup(guest):
        install_debs(guest, repo, ["nginx"])
        guest.copy_from_host(FILES / "ceeformat.conf", "/etc/nginx/conf.d/ceeformat.conf")
        guest.succeed("rm -f /etc/nginx/sites-enabled/default")
        guest.copy_from_host(FILES / "sites.conf", "/etc/nginx/sites-enabled/sites.conf")
        guest.copy_from_host(FILES / "www", "/srv/www")
        guest.succeed("nginx -t && systemctl enable nginx && systemctl restart nginx")

    return kvm_snapshot("nixos-port-nginx", setup, inputs=SITE_FILES)
