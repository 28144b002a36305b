#!/usr/bin/env bash
# The tests: lint, types, import layers (lint-imports), then unit, plugin and integration
# tests (real guests) on debian-12; then the catalog matrix (scripts/test-matrix.sh): the
# example suite on every Debian release of the catalog, and the 40-test stress run over
# three images.
# Arguments go to the first pytest run; PYTEST_KVM_MATRIX=0 leaves the matrix out.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check pytest_kvm tests examples bench
.venv/bin/ruff format --check pytest_kvm tests examples bench
.venv/bin/mypy pytest_kvm
.venv/bin/lint-imports  # the layers of pyproject.toml [tool.importlinter]
# Two workers, a test file each at a time (a file's tests share its fixtures: a
# libvirtd, a netns). examples/ run in the matrix stage, debian-12 included.
.venv/bin/pytest tests/ --kvm-image debian-12 -n 2 --dist loadfile -p no:cacheprovider -ra \
  --durations=25 "$@"
if [ "${PYTEST_KVM_MATRIX:-1}" != 0 ]; then
  bash scripts/test-matrix.sh
fi
