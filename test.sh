#!/usr/bin/env bash
# rhyve's whole test suite: what README.md tells you to run and .ci/run runs.
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -c /dev/kvm ]; then
  echo "test.sh: /dev/kvm is missing: rhyve's VM tests need KVM and are never skipped" >&2
  exit 1
fi
scripts/setup.sh
host_kind=$(scripts/host-kind.sh)
echo "test.sh: host: $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo), $host_kind"
echo "test.sh: plan (README.md \"What runs where\", the same on every host kind): the full"
echo "  Linux boot with its driver checks (scripts/full-boot.sh 1) on one core, the cargo tests"
echo "  at nice 19 beside it, the UEFI firmware's two runs (uefi_firmware: shell, then GRUB to"
echo "  Linux) among them;"
echo "  with the build done about 35-40 min on AMD PVM hosts, ~15 on Intel PVM hosts (expected:"
echo "  the firmware test's two runs are the longest part)"
export RHYVE_GUEST_KERNEL="${RHYVE_GUEST_KERNEL:-$(scripts/fetch-guest-kernel.sh)}"

# Debian's stock kernel booted to user space (scripts/full-boot.sh: /init
# lists Linux's PCI functions, prints BOOT-OK, loads Linux's virtio and
# ACPI button drivers and exercises every virtio device with them, then
# powers off when the host presses the power button) takes about
# 17 minutes on the slower software-virtualization host kind (AMD PVM) and
# about 3.5 on the faster (Intel PVM). The plan is made for the slower: the
# boot starts first, on one vCPU, and the cargo tests run beside it at the
# lowest CPU priority, so the boot keeps a core; its result is checked at
# the end.
mkdir -p work
full_boot_out=work/full-boot-suite.out
scripts/full-boot.sh 1 >"$full_boot_out" 2>&1 &
full_boot=$!
trap 'kill "$full_boot" 2>/dev/null; pkill -KILL -f "^bhyve: fullboot1" 2>/dev/null || true' EXIT
# It builds and prepares what it boots itself: let it do so on an idle
# machine, until its VM runs (or the script ends, failing).
while kill -0 "$full_boot" 2>/dev/null && ! pgrep -f "^bhyve: fullboot1" >/dev/null; do
  sleep 1
done

status=0
nice -n 19 cargo build --workspace --all-targets || status=$?
[ "$status" -ne 0 ] || nice -n 19 cargo test --workspace --no-fail-fast || status=$?

echo "test.sh: waiting for the full Linux boot (scripts/full-boot.sh 1, output in $full_boot_out)"
if wait "$full_boot"; then
  grep -E "^(rhyve full-boot guest|pci |BOOT-OK|dev |host: |DRIVERS-DONE|bhyve exited|full-boot: )" "$full_boot_out"
else
  tail -n 40 "$full_boot_out"
  echo "test.sh: FAILED: the full Linux boot (scripts/full-boot.sh 1)" >&2
  status=1
fi
trap - EXIT
exit "$status"
