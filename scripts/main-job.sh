#!/usr/bin/env bash
# The main job: the example suite in a real Debian 12 guest (qemu backend, user network).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/pytest examples/ --kvm-image debian-12 -v -p no:cacheprovider "$@"
