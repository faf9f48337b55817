#!/usr/bin/env bash
# rhyve's whole test suite: what README.md tells you to run and .ci/run runs.
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -c /dev/kvm ]; then
  echo "test.sh: /dev/kvm is missing: rhyve's VM tests need KVM and are never skipped" >&2
  exit 1
fi
scripts/setup.sh
export RHYVE_GUEST_KERNEL="${RHYVE_GUEST_KERNEL:-$(scripts/fetch-guest-kernel.sh)}"
cargo build --workspace --all-targets
cargo test --workspace --no-fail-fast
