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
# The full boot's kernel: Debian's generic one judges every device with
# Linux's drivers (AHCI disk and CD, e1000 too) but takes about twice as
# long to boot as the cloud one, which has no AHCI or e1000 driver; the
# slow host kinds take the cloud one (README.md "What runs where").
case "$host_kind" in
  pvm-amd | pvm-other) boot_kernel="${RHYVE_FULL_BOOT_KERNEL:-cloud}" ;;
  *) boot_kernel="${RHYVE_FULL_BOOT_KERNEL:-generic}" ;;
esac
echo "test.sh: plan (README.md \"What runs where\"): the full Linux boot with its driver"
echo "  checks (scripts/full-boot.sh 1 $boot_kernel) on one core, the cargo tests at nice 19"
echo "  beside it, the UEFI firmware's boot to its shell (uefi_firmware) among them. The"
echo "  generic kernel's boot (Intel PVM and hardware hosts) judges AHCI disk and CD and e1000"
echo "  with Linux's drivers too: ~7 min expected on Intel PVM hosts; the cloud kernel's boot"
echo "  (AMD PVM hosts, ~17 min) enumerates them only; the suite, build done, about 20 min on"
echo "  AMD PVM hosts (expected), 8-9 on Intel PVM hosts (expected)"
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
scripts/full-boot.sh 1 "$boot_kernel" >"$full_boot_out" 2>&1 &
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

echo "test.sh: waiting for the full Linux boot (scripts/full-boot.sh 1 $boot_kernel, output in $full_boot_out)"
if wait "$full_boot"; then
  grep -E "^(rhyve full-boot guest|pci |BOOT-OK|dev |host: |DRIVERS-DONE|bhyve exited|full-boot: )" "$full_boot_out"
else
  tail -n 40 "$full_boot_out"
  echo "test.sh: FAILED: the full Linux boot (scripts/full-boot.sh 1 $boot_kernel)" >&2
  status=1
fi
trap - EXIT
exit "$status"
