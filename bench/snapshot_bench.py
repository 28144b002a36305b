"""Ten tests that each need nginx installed and configured: installed in every test,
against one ``kvm_snapshot`` that all ten restore.

    .venv/bin/python bench/snapshot_bench.py --image debian-12

The guests install nginx with ``apt-get`` from a small local repository: nginx and its
dependencies, fetched once with the host's own apt (its configured sources) into
``<cache>/bench-debs``, indexed with ``dpkg-scanpackages`` (dpkg-dev) and served on
127.0.0.1, which a guest on user networking reaches as 10.0.2.2. So both suites do the
same ``apt-get update && apt-get install`` a user's would, without network traffic
beyond this host.

Three runs of ``pytest``, wall time each: the per-test install suite; the snapshot
suite with no snapshot cached (it builds the snapshot, then ten clones); the snapshot
suite again (cached: what every later run costs).
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

from pytest_kvm import hostdebs

PACKAGES = ("nginx",)

SITE = """\
server {
    listen 80 default_server;
    root /srv/bench;
    location / { try_files $uri =404; }
}
"""

CONFTEST = """
import os

import pytest

REPO = f"http://10.0.2.2:{os.environ['BENCH_REPO_PORT']}/"
SITE = os.path.join(os.path.dirname(__file__), "site.conf")
# The guest's apt uses the local repository only.
USE_REPO = (
    "rm -f /etc/apt/sources.list /etc/apt/sources.list.d/*; "
    f"echo 'deb [trusted=yes] {REPO} ./' >/etc/apt/sources.list.d/bench.list"
)


def install_nginx(guest):
    guest.succeed(USE_REPO)
    guest.succeed("apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx",
                  timeout=900)
    guest.put(SITE, "/etc/nginx/sites-enabled/default")
    guest.succeed("mkdir -p /srv/bench && echo bench-ok >/srv/bench/index.html && "
                  "systemctl restart nginx")


def check_serves(guest, n):
    guest.succeed(f"echo test-{n} >/srv/bench/{n}.html")
    out = guest.succeed(
        "python3 -c 'import sys, urllib.request; "
        "print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())' "
        f"http://127.0.0.1/{n}.html"
    )
    assert out.strip() == f"test-{n}"
"""

TEST_EACH = """
import pytest
from conftest import check_serves, install_nginx


@pytest.mark.parametrize("n", range(10))
def test_nginx(kvm_guest, n):
    install_nginx(kvm_guest)
    check_serves(kvm_guest, n)
"""

TEST_SNAPSHOT = """
import os

import pytest
from conftest import SITE, check_serves, install_nginx


@pytest.fixture(scope="session")
def web(kvm_snapshot):
    return kvm_snapshot("bench-nginx", install_nginx, inputs=[SITE])


@pytest.mark.parametrize("n", range(10))
def test_nginx(kvm_guest_factory, web, n):
    guest = kvm_guest_factory(image=web)
    check_serves(guest, n)
"""


def fetch_debs(dest: Path) -> None:
    """nginx and everything it depends on, with the host's apt, into ``dest``."""
    hostdebs.fetch_debs(PACKAGES, dest)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def serve(root: Path) -> tuple[http.server.ThreadingHTTPServer, int]:
    handler = functools.partial(_Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


def suite(workdir: Path, test: str, args: argparse.Namespace, port: int) -> float:
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test,
            f"--kvm-image={args.image}", f"--kvm-cache={args.cache}"]  # fmt: skip
    env = {**os.environ, "BENCH_REPO_PORT": str(port)}
    t0 = time.monotonic()
    done = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{test} failed:\n{done.stdout[-4000:]}\n{done.stderr[-2000:]}")
    print(f"{test}: {wall:.1f} s ({done.stdout.strip().splitlines()[-1]})")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="debian-12")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "pytest-kvm")
    args = parser.parse_args()
    for tool in ("apt-get", "apt-cache", "dpkg-scanpackages"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is needed (Debian packages apt, dpkg-dev)")
    repo = args.cache / "bench-debs"
    fetch_debs(repo)
    server, port = serve(repo)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-snapshot-") as tmp:
            work = Path(tmp)
            (work / "conftest.py").write_text(textwrap.dedent(CONFTEST))
            (work / "site.conf").write_text(SITE)
            (work / "test_each.py").write_text(TEST_EACH)
            # A new key for the snapshot (its inputs): built in this run, not cached.
            (work / "site.conf").write_text(SITE + f"# bench {time.time()}\n")
            (work / "test_snapshot.py").write_text(TEST_SNAPSHOT)
            each = suite(work, "test_each.py", args, port)
            built = suite(work, "test_snapshot.py", args, port)
            cached = suite(work, "test_snapshot.py", args, port)
    finally:
        server.shutdown()
    print()
    print(f"- Date: {time.strftime('%Y-%m-%d')}")
    print(f"- Machine: {platform.platform()}, {os.cpu_count()} cores")
    print("| suite (10 tests, nginx installed and configured) | wall s | vs per-test install |")
    print("|---|---|---|")
    print(f"| apt-get install in every test | {each:.1f} | 1.0x |")
    print(f"| one kvm_snapshot, built in this run | {built:.1f} | {each / built:.1f}x |")
    print(f"| one kvm_snapshot, cached | {cached:.1f} | {each / cached:.1f}x |")


if __name__ == "__main__":
    main()
