#!/usr/bin/env bash
# Boot Debian's stock cloud kernel to user space under rhyve and check it:
# /init (crates/guests/linux-init/init.c) mounts /proc, prints the kernel
# release, the CPU count and the PCI functions Linux enumerated, prints
# BOOT-OK with /proc/uptime and powers the VM off through ACPI (bhyve exit
# status 1). The machine has a virtio-blk and an AHCI disk besides the host
# bridge and LPC; the script checks Linux listed all four functions with
# bhyve's IDs and that its rtc_cmos driver registered the RTC.
#
#   scripts/full-boot.sh [CPUS]      (default 1)
#
# On hardware KVM this takes seconds. On a software-virtualization host
# (PVM) every guest ring-0 instruction is emulated and the boot takes about
# 3.5 minutes (Intel hosts) to 17 (AMD hosts); test.sh runs it beside the
# cargo tests.
# The kernel's ELF image is booted through its PVH entry (extracted on the
# host, so the guest does not decompress itself), the initramfs is small
# and uncompressed, and the command line:
#   - keeps the kernel off what KVM's emulator lacks and rhyve's assist
#     does not cover (cx16, ssse3, XSAVE);
#   - vdso=0 and clearcpuid=smep,smap: no 64-bit vDSO, and the kernel may
#     run code on user pages, which /init's system calls rely on (see
#     init.c: from user mode PVM delivers only the ia32 doors, sysenter on
#     Intel hosts and syscall on AMD ones, that one with RIP cut to 32
#     bits);
#   - drops work that only costs time here: the crypto self-tests (RSA
#     test vectors alone run for many minutes in emulated ring 0 and make
#     the built-in X.509 certificates time out) and BLAKE2s's, the
#     rewriting of enum names in the trace events' formats (minutes of
#     string work), the read-only marking of kernel data and its W+X
#     check, the soft-lockup, hung-task and RCU-stall watchdogs' traces,
#     IPv6 set-up, speculation mitigations on every kernel entry and
#     return, zeroing of every allocation.
set -euo pipefail
cd "$(dirname "$0")/.."
cpus="${1:-1}"
scripts/setup.sh
cargo build --release --bin bhyve
kernel="$(scripts/fetch-guest-kernel.sh --elf)"
init="$(cargo run -q --release -p rhyve-guests --bin rhyve-guest-path -- linux-init)"
initrd=work/guest/full-boot-initramfs.cpio
scripts/build-initramfs.sh "$initrd" "$init"
disks=(work/guest/full-boot-virtio.img work/guest/full-boot-ahci.img)
truncate -s 1M "${disks[@]}"
log="work/full-boot-c$cpus.log"
cmdline="console=ttyS0 clearcpuid=cx16,ssse3,smep,smap noxsave vdso=0 nosoftlockup sysctl.kernel.hung_task_timeout_secs=0 ipv6.disable=1 mitigations=off init_on_alloc=0 cryptomgr.notests initcall_blacklist=trace_eval_init,blake2s_mod_init rodata=off rcupdate.rcu_cpu_stall_suppress=1 panic=-1"
start=$(date +%s)
set +e
./target/release/bhyve -A -H -P -c "$cpus" -m 256M -s 0,hostbridge -s 31,lpc -l com1,stdio \
  -s 3,virtio-blk,"${disks[0]}" -s 4,ahci-hd,"${disks[1]}" \
  -o boot.kernel="$kernel" -o boot.initrd="$initrd" -o boot.cmdline="$cmdline" \
  "fullboot$cpus" < /dev/null | tee "$log"
status=${PIPESTATUS[0]}
set -e
echo "bhyve exited with status $status after $(( $(date +%s) - start )) s"
grep -q "^BOOT-OK uptime " "$log" || { echo "full-boot: no BOOT-OK line" >&2; exit 1; }
for function in "0000 12751275" "0018 1af41001" "0020 80862821" "00f8 80867000"; do
  grep -q "^pci $function " "$log" || { echo "full-boot: Linux did not list PCI function $function" >&2; exit 1; }
done
grep -q "rtc_cmos .*: registered as rtc0" "$log" || { echo "full-boot: Linux's rtc_cmos did not register the RTC" >&2; exit 1; }
[ "$status" -eq 1 ] || { echo "full-boot: expected exit status 1 (ACPI power-off)" >&2; exit 1; }
echo "full-boot: OK with $cpus CPU(s)"
