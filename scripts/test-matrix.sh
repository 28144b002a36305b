#!/usr/bin/env bash
# The catalog matrix (run by scripts/test.sh after the main suite): the example suite
# and the catalog facts on every Debian release of the catalog and on the sysvinit
# image, two xdist workers grouped by image, with the error gate failing a test whose
# guest dumped core or logged a kernel oops or warning (--kvm-fail-on); then the stress
# run, 40 guest tests over three images with -n 4, counting leftovers.
#   KVM_MATRIX_IMAGES="debian-11 debian-13"  bash scripts/test-matrix.sh [pytest args]
# debian-testing is left out by default: it moves daily, with the archive.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
read -r -a images <<<"${KVM_MATRIX_IMAGES:-debian-11 debian-12 debian-13 debian-12-sysvinit}"
args=()
for name in "${images[@]}"; do
  args+=(--kvm-image "$name")
done
# Two builds at a time (cached: quick once built): a build is mostly one process.
printf '%s\n' "${images[@]}" | xargs -P 2 -I{} .venv/bin/pytest-kvm image build {}
.venv/bin/pytest examples/ tests/integration/test_catalog.py "${args[@]}" --kvm-fail-on=coredump,oops \
  -n 2 --kvm-dist-by-image -p no:cacheprovider -ra --durations=15 "$@"
.venv/bin/pytest tests/integration/test_stress.py "${args[@]}" -p no:cacheprovider -ra "$@"
# riscv64 guests (issue 21): the example suite and the architecture checks on
# debian-13-riscv64, here rather than in scripts/test.sh (arm64's run is there): the
# slowest guests under TCG. KVM_MATRIX_RISCV64=0 leaves it out.
if [ "${KVM_MATRIX_RISCV64:-1}" != 0 ] && [ -f pytest_kvm/images/catalog/debian-13-riscv64.toml ]; then
  .venv/bin/pytest-kvm image build debian-13-riscv64
  .venv/bin/pytest examples/ tests/integration/test_arch.py --kvm-image debian-13-riscv64 \
    -p no:cacheprovider -ra --durations=10 "$@"
elif [ "${KVM_MATRIX_RISCV64:-1}" != 0 ]; then
  echo "test-matrix.sh: no debian-13-riscv64 recipe in the catalog: the riscv64 stage is left out"
fi
