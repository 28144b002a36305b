#!/usr/bin/env bash
# Idempotent set-up on a Debian 12 machine, as root: apt packages, the virtualenv,
# and the debian-12 test image in the cache. Sourced by main-job.sh and test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  qemu-system-x86 qemu-utils            # guests and overlays
  mmdebstrap grub-pc-bin grub-common    # building the Debian image
  e2fsprogs fdisk dosfstools mtools     # (dosfstools, mtools: the EFI system partition)
  ovmf                                  # --kvm-firmware uefi, uefi-secure (OVMF)
  openssh-client                        # ssh_command, tests of host-key pinning
  python3 python3-venv python3-guestfs  # libguestfs' binding comes from Debian
  linux-image-amd64                     # libguestfs builds its appliance from a host kernel
  dpkg-dev                              # examples build a .deb
  iproute2 dnsmasq-base                 # bridge tests: a bridge and DHCP in a network namespace
  libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients  # the libvirt backend
  libvirt-daemon-config-network iptables  # libvirt's "default" NAT network
  libvirt-dev pkg-config gcc python3-dev  # building libvirt-python (it has no wheels)
  make                                  # tests build a kernel module that warns (gcc, make)
  openssh-server                        # the "remote" hypervisor of the tests: sshd on 127.0.0.1
  isolinux syslinux-common busybox-static  # the mini install ISO of tests/integration/test_installer.py
  gpgv                                  # checks signed checksum files (Fedora's)
  gnupg openssl                         # tests: a throwaway signing key, a local https server
  tcpdump                               # tests read kvm_vlan captures with tcpdump -r
  tesseract-ocr tesseract-ocr-eng       # guest.screen_text() by OCR of a graphical screen
  swtpm swtpm-tools                     # tpm=True: an emulated TPM 2.0 per guest (libvirt runs swtpm_setup)
  debootstrap                           # arm64/riscv64 images: --foreign unpacks them on this host, --second-stage configures them in a chroot
  qemu-user-static                      # arm64/riscv64 images: their programs run in that chroot under qemu-user (binfmt_misc)
  qemu-system-arm                       # arm64 guests (qemu-system-aarch64)
  qemu-efi-aarch64                      # arm64 images: AAVMF, the UEFI firmware that boots them
  qemu-system-misc                      # riscv64 guests (qemu-system-riscv64)
  opensbi                               # riscv64 images: the SBI firmware (fw_jump.elf) under U-Boot
  u-boot-qemu                           # riscv64 images: U-Boot (qemu-riscv64_smode) boots them from /boot/extlinux/extlinux.conf
)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  # Install services without starting them: the libvirt tests start their own
  # libvirtd in a network namespace, and stop it (tests/integration/support/libvirtd.py).
  policy=/usr/sbin/policy-rc.d
  made_policy=
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && made_policy=1
  fi
  status=0
  apt-get install -y -q --no-install-recommends "${missing[@]}" || status=$?
  [ -z "$made_policy" ] || rm -f "$policy"
  [ "$status" -eq 0 ] || exit "$status"
fi

# arm64/riscv64 image builds run the image's programs under qemu-user-static
# through binfmt_misc. A machine booted with systemd has registered Debian's
# entries already; where nothing has (a container, a VM whose init is not
# systemd), mount binfmt_misc and register them as systemd-binfmt would.
binfmt=/proc/sys/fs/binfmt_misc
if [ ! -e "$binfmt/register" ]; then
  mount -t binfmt_misc binfmt_misc "$binfmt" || echo "setup: cannot mount binfmt_misc: arm64/riscv64 images cannot be built here"
fi
for arch in aarch64 riscv64; do
  conf=/usr/lib/binfmt.d/qemu-$arch.conf
  if [ -e "$binfmt/register" ] && [ ! -e "$binfmt/qemu-$arch" ] && [ -f "$conf" ]; then
    grep '^:' "$conf" >"$binfmt/register" && echo "setup: registered $conf with binfmt_misc"
  fi
done

# The venv sees Debian's python3-guestfs through the system site packages.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import pytest_kvm, libvirt' 2>/dev/null; then
  echo "setup: creating .venv"
  /usr/bin/python3 -m venv --system-site-packages .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
elif ! .venv/bin/python -c 'import pytest_html, testinfra, build, importlinter' 2>/dev/null; then
  # A venv made before a dev dependency was added: bring it up to date.
  echo "setup: updating .venv"
  .venv/bin/python -m pip install -q -e '.[dev]'
fi

# Build the catalog image once; later runs find it in the cache.
.venv/bin/pytest-kvm image build debian-12
