#!/usr/bin/env bash
# The tests: lint, types, import layers (lint-imports), then unit, plugin and integration
# tests (real guests) on debian-12-minimal; then the catalog matrix
# (scripts/test-matrix.sh): the example suite and the catalog checks on every Debian
# release of the catalog (debian-12 with its full package set included), the
# 40-test stress run over three images, and the example suite on arm64 guests.
# The integration tests prove pytest-kvm's machinery, which does not depend on the
# package set: on debian-12-minimal (debian-12's small variant) every real boot and
# template build is about a quarter faster (bench/RESULTS.md); the matrix runs the
# examples and the catalog's own checks on the full images.
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
.venv/bin/pytest-kvm image build debian-12-minimal  # cached: quick once built
.venv/bin/pytest tests/ --kvm-image debian-12-minimal -n 2 --dist loadfile -p no:cacheprovider -ra \
  --durations=25 "$@"
# The matrix also runs the example suite on arm64 guests (debian-12-arm64, under
# TCG); riscv64 (debian-13-riscv64) only with KVM_MATRIX_RISCV64=1 here, for CI's
# time: about 10 more minutes (README, "Architectures").
if [ "${PYTEST_KVM_MATRIX:-1}" != 0 ]; then
  KVM_MATRIX_RISCV64="${KVM_MATRIX_RISCV64:-0}" bash scripts/test-matrix.sh
fi
