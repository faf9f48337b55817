#!/usr/bin/env bash
# Boot Debian's stock cloud kernel to user space under rhyve and check it:
# the busybox /init mounts /proc, prints BOOT-OK with /proc/uptime and
# powers the VM off through ACPI (bhyve exit status 1).
#
#   scripts/full-boot.sh [CPUS]      (default 1)
#
# On hardware KVM this takes seconds. On a software-virtualization host
# (PVM) every guest ring-0 instruction is emulated and the boot takes tens
# of minutes, which is why it is a script and not part of the CI suite.
# The kernel's ELF image is booted through its PVH entry (extracted on the
# host, so the guest does not decompress itself), the initramfs is left
# uncompressed, and the command line keeps the kernel off what KVM's
# emulator lacks and rhyve's assist does not cover (cx16, ssse3, XSAVE)
# and off the soft-lockup watchdog and IPv6 set-up, which only cost time.
set -euo pipefail
cd "$(dirname "$0")/.."
cpus="${1:-1}"
scripts/setup.sh
cargo build --release --bin bhyve
kernel="$(scripts/fetch-guest-kernel.sh --elf)"
initrd=work/guest/full-boot-initramfs.cpio
[ -f "$initrd" ] || scripts/build-initramfs.sh "$initrd"
log="work/full-boot-c$cpus.log"
start=$(date +%s)
set +e
./target/release/bhyve -A -H -P -c "$cpus" -m 512M -s 0,hostbridge -s 31,lpc -l com1,stdio \
  -o boot.kernel="$kernel" -o boot.initrd="$initrd" \
  -o boot.cmdline="console=ttyS0 clearcpuid=cx16,ssse3 noxsave nosoftlockup sysctl.kernel.hung_task_timeout_secs=0 ipv6.disable=1 panic=-1" \
  "fullboot$cpus" < /dev/null | tee "$log"
status=${PIPESTATUS[0]}
set -e
echo "bhyve exited with status $status after $(( $(date +%s) - start )) s"
grep -q "^BOOT-OK uptime " "$log" || { echo "full-boot: no BOOT-OK line" >&2; exit 1; }
[ "$status" -eq 1 ] || { echo "full-boot: expected exit status 1 (ACPI power-off)" >&2; exit 1; }
echo "full-boot: OK with $cpus CPU(s)"
