#!/usr/bin/env bash
# Idempotent set-up on a Debian 12 machine, as root: apt packages, the virtualenv,
# and the debian-12 test image in the cache. Sourced by main-job.sh and test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  qemu-system-x86 qemu-utils            # guests and overlays
  mmdebstrap grub-pc-bin grub-common    # building the Debian image
  e2fsprogs fdisk dosfstools
  openssh-client                        # ssh_command, tests of host-key pinning
  python3 python3-venv python3-guestfs  # libguestfs' binding comes from Debian
  linux-image-amd64                     # libguestfs builds its appliance from a host kernel
  dpkg-dev                              # examples build a .deb
  iproute2 dnsmasq-base                 # bridge tests: a bridge and DHCP in a network namespace
)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# The venv sees Debian's python3-guestfs through the system site packages.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import pytest_kvm' 2>/dev/null; then
  echo "setup: creating .venv"
  /usr/bin/python3 -m venv --system-site-packages .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
fi

# Build the catalog image once; later runs find it in the cache.
.venv/bin/pytest-kvm image build debian-12
