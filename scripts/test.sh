#!/usr/bin/env bash
# The tests: lint, types, then unit, plugin, integration (real guests) and example tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check pytest_kvm tests examples bench
.venv/bin/ruff format --check pytest_kvm tests examples bench
.venv/bin/mypy pytest_kvm
exec .venv/bin/pytest tests/ examples/ --kvm-image debian-12 -p no:cacheprovider -ra --durations=25 "$@"
