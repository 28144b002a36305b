#!/usr/bin/env bash
# The catalog matrix (run by scripts/test.sh after the main suite): the example suite
# and the catalog facts on every Debian release of the catalog and on the sysvinit
# image, two xdist workers grouped by image, with the error gate failing a test whose
# guest dumped core or logged a kernel oops or warning (--kvm-fail-on); then the stress
# run, 40 guest tests over three images with -n 4, counting leftovers; then guests of
# other architectures (issue 21): the example suite and tests/integration/test_arch.py
# over debian-12 and debian-12-arm64 (a bundled image matrix, a worker per image),
# and debian-13-riscv64 in the same run unless KVM_MATRIX_RISCV64=0 (scripts/test.sh
# leaves riscv64 out by default, for CI's time; see README).
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
foreign=(debian-12-arm64)
if [ "${KVM_MATRIX_RISCV64:-1}" != 0 ]; then
  foreign+=(debian-13-riscv64)
else
  echo "test-matrix.sh: KVM_MATRIX_RISCV64=0: the riscv64 guests (debian-13-riscv64) are left out"
fi
# Two builds at a time (cached: quick once built): a build is mostly one process
# (a foreign one's configure stage is one qemu-user process after another).
printf '%s\n' "${foreign[@]}" "${images[@]}" | xargs -P 2 -I{} .venv/bin/pytest-kvm image build {}
.venv/bin/pytest examples/ tests/integration/test_catalog.py "${args[@]}" --kvm-fail-on=coredump,oops \
  -n 2 --kvm-dist-by-image -p no:cacheprovider -ra --durations=15 "$@"
.venv/bin/pytest tests/integration/test_stress.py "${args[@]}" -p no:cacheprovider -ra "$@"
# The example suite and the architecture checks (uname -m, SSH, console, clones from
# a template and a prepared snapshot, libguestfs, artifacts) on the host's
# architecture and on the others, each image on a worker of its own; all under TCG.
foreign_args=(--kvm-image debian-12)
for name in "${foreign[@]}"; do
  foreign_args+=(--kvm-image "$name")
done
.venv/bin/pytest examples/ tests/integration/test_arch.py "${foreign_args[@]}" -n 2 \
  --kvm-dist-by-image -p no:cacheprovider -ra --durations=10 "$@"
