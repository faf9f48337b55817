#!/usr/bin/env bash
# Boot Debian's stock generic kernel to user space under rhyve and check it:
# /init (crates/guests/linux-init/init.c) mounts /proc, prints the kernel
# release, the CPU count and the PCI functions Linux enumerated, prints
# BOOT-OK with /proc/uptime and powers the VM off through ACPI (bhyve exit
# status 1). The script checks Linux listed every PCI function with bhyve's
# IDs and that its rtc_cmos driver registered the RTC. Then /init loads
# Linux's own drivers from the initramfs (Debian's modules, dependencies
# resolved on the host) and exercises the devices with them, the host
# playing its part (scripts/full-boot-host.py, in a network namespace of
# its own):
#   - virtio-blk: vda's first MiB read and summed (the host's sum must
#     match), 64 KiB of a pattern written at 1 MiB and synced (the host
#     finds it in the image); vdb, attached `ro`, is read-only to Linux
#     and refuses a write;
#   - virtio-rnd: Linux's hwrng reads from it;
#   - virtio-console: a line each way through the port named port1 and the
#     host's socket;
#   - virtio-net on a tap: the guest pings the host, the host pings the
#     guest, 256 KiB each way over TCP with matching sums;
#   - e1000 on a tap of its own: Linux's e1000 driver, the same ping and
#     TCP exchange as virtio-net's (10.99.2.0/24, eth1);
#   - ahci-hd: Linux's ahci/libata/sd_mod read sda's first MiB (the host's
#     sum must match), write 64 KiB of another pattern at 1 MiB and sync
#     (the host finds it in the image);
#   - ahci-cd: sr_mod reads sr0, an ISO 9660 image made here with xorriso,
#     whole (the host's sum must match); isofs mounts it and a file is read;
#   - the ACPI power button: SIGTERM to bhyve reaches /init as KEY_POWER
#     from Linux's button driver, and /init powers off (exit status 1);
#   - nvme (Linux's nvme driver, built into the cloud kernel, a module of
#     the generic one): the controller's model and serial, the disk's first
#     MiB read and summed (the host's sum must match), 64 KiB of a pattern
#     written at 1 MiB and synced and the next 64 KiB discarded (the host
#     finds the pattern, and zeroes where the random data was).
# The e1000 and AHCI checks need Debian's generic kernel (linux-image-amd64):
# only it builds AHCI, SCSI disk/CD-ROM, ISO 9660 and e1000 drivers (as
# modules). With the cloud kernel (linux-image-cloud-amd64), which boots
# about twice as fast here, those two are enumerated only.
#
#   scripts/full-boot.sh [CPUS [generic|cloud]] [--checkpoint-restore]
#                                                   (default 1 generic)
#
# --checkpoint-restore: in the middle of the kernel's initcalls (at "NET:
# Registered PF_INET protocol family") the VM is checkpointed (bhyvectl
# --checkpoint), bhyve killed, and the checkpoint restored in a new bhyve
# (-r), which must then pass every check below.
#
# On hardware KVM this takes seconds. On a software-virtualization host
# (PVM) every guest ring-0 instruction is emulated and the boot takes about
# 3.5 minutes (Intel hosts) to 17 (AMD hosts) with the cloud kernel, about
# twice that with the generic one (README.md "What runs where"); test.sh
# runs it beside the cargo tests.
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
positional=()
checkpoint=()
for arg in "$@"; do
  case "$arg" in
    --checkpoint-restore) checkpoint=(--checkpoint-at "NET: Registered PF_INET protocol family"
                                      --checkpoint "$PWD/work/guest/full-boot-checkpoint") ;;
    *) positional+=("$arg") ;;
  esac
done
cpus="${positional[0]:-1}"
flavour="${positional[1]:-generic}"
case "$flavour" in
  generic) kernel_dir=work/guest-generic fetch_flag=--generic
    drivers=virtio_pci,virtio_blk,virtio_net,virtio_console,virtio-rng,button,evdev,nvme,e1000,ahci,sd_mod,sr_mod,isofs ;;
  cloud) kernel_dir=work/guest fetch_flag=""
    drivers=virtio_pci,virtio_blk,virtio_net,virtio_console,virtio-rng,button,evdev,nvme ;;
  *) echo "full-boot: unknown kernel \"$flavour\" (generic or cloud)" >&2; exit 2 ;;
esac
scripts/setup.sh
cargo build --release --bin bhyve --bin bhyvectl
kernel="$(scripts/fetch-guest-kernel.sh $fetch_flag --elf)"
moddir="$(ls -d $kernel_dir/kernel/lib/modules/*/ | head -n1)"
init="$(cargo run -q --release -p rhyve-guests --bin rhyve-guest-path -- linux-init)"
initrd=work/guest/full-boot-initramfs.cpio
scripts/build-initramfs.sh "$initrd" "$init" --modules "$moddir" "$drivers"
vda=work/guest/full-boot-vda.img
vdb=work/guest/full-boot-vdb.img
ahci=work/guest/full-boot-ahci.img
iso=work/guest/full-boot-cd.iso
nvme=work/guest/full-boot-nvme.img
head -c 2M /dev/urandom > "$vda"
head -c 2M /dev/urandom > "$ahci"
head -c 2M /dev/urandom > "$nvme"
truncate -s 1M "$vdb"
cd_dir=$(mktemp -d)
echo "rhyve ahci-cd" > "$cd_dir/hello.txt"
head -c 300K /dev/urandom > "$cd_dir/random.bin"
rm -f "$iso"
xorriso -as mkisofs -quiet -R -V RHYVECD -o "$iso" "$cd_dir"
rm -rf "$cd_dir"
fnv1a64() { # fnv1a64 FILE [BYTES]: FNV-1a 64 of the file's first BYTES (all)
  python3 -c 'import sys
h = 0xcbf29ce484222325
for b in open(sys.argv[1], "rb").read(int(sys.argv[2]) if len(sys.argv) > 2 else -1):
    h = ((h ^ b) * 0x100000001b3) & 0xffffffffffffffff
print(f"{h:016x}")' "$@"
}
vda_sum=$(fnv1a64 "$vda" 1048576)
ahci_sum=$(fnv1a64 "$ahci" 1048576)
nvme_sum=$(fnv1a64 "$nvme" 1048576)
iso_sum=$(fnv1a64 "$iso")
iso_size=$(stat -c %s "$iso")
console_sock="$PWD/work/guest/full-boot-console$cpus.sock"
rm -f "$console_sock"
netns="rhyvefb$cpus"
tap="tapfb$cpus"
e1000_tap="tapfbe$cpus"
ip netns del "$netns" 2>/dev/null || true
ip netns add "$netns"
ip -n "$netns" link set lo up
trap 'ip netns del "$netns" 2>/dev/null || true' EXIT
log="work/full-boot-c$cpus.log"
cmdline="console=ttyS0 clearcpuid=cx16,ssse3,smep,smap noxsave vdso=0 nosoftlockup sysctl.kernel.hung_task_timeout_secs=0 ipv6.disable=1 mitigations=off init_on_alloc=0 cryptomgr.notests initcall_blacklist=trace_eval_init,blake2s_mod_init rodata=off rcupdate.rcu_cpu_stall_suppress=1 panic=-1"
start=$(date +%s)
set +e
ip netns exec "$netns" python3 scripts/full-boot-host.py --tap "$tap" --e1000-tap "$e1000_tap" --console-socket "$console_sock" "${checkpoint[@]}" -- \
  ./target/release/bhyve -A -H -P -c "$cpus" -m 256M -s 0,hostbridge -s 31,lpc -l com1,stdio \
  -s 3,virtio-blk,"$vda" -s 4,ahci-hd,"$ahci" -s 5,virtio-blk,"$vdb",ro \
  -s 6,virtio-net,"$tap" -s 7,virtio-console,port1="$console_sock" -s 8,virtio-rnd \
  -s 9,nvme,"$nvme" -s 12,e1000,"$e1000_tap" -s 13,ahci-cd,"$iso" \
  -o boot.kernel="$kernel" -o boot.initrd="$initrd" -o boot.cmdline="$cmdline" \
  "fullboot$cpus" | tee "$log"
status=${PIPESTATUS[0]}
set -e
echo "bhyve exited with status $status after $(( $(date +%s) - start )) s"
# The guest's tty ends its lines with CR LF.
sed -i 's/\r$//' "$log"
failed=0
check() { # check DESCRIPTION PATTERN: a line of the log matches PATTERN
  if grep -qE -- "$2" "$log"; then
    echo "full-boot: ok: $1"
  else
    echo "full-boot: FAILED: $1 (no line matching '$2')" >&2
    failed=1
  fi
}
check "BOOT-OK" "^BOOT-OK uptime "
if [ ${#checkpoint[@]} -gt 0 ]; then
  check "checkpoint: taken during the initcalls, bhyve killed" "^host: checkpointed in .*, bhyve killed$"
  check "checkpoint: restored in a new bhyve" "^host: restoring the checkpoint in a new bhyve$"
  rm -f work/guest/full-boot-checkpoint work/guest/full-boot-checkpoint.kern work/guest/full-boot-checkpoint.meta
fi
check "BOOT-OK" "^BOOT-OK uptime "
for function in "0000 12751275" "0018 1af41001" "0020 80862821" "0028 1af41001" "0030 1af41000" "0038 1af41003" "0040 1af41005" "0048 fb5d0a0a" "0060 8086100f" "0068 80862821" "00f8 80867000"; do
  check "Linux lists PCI function $function" "^pci $function "
done
check "Linux's rtc_cmos registered the RTC" "rtc_cmos .*: registered as rtc0"
check "every module loaded" "^dev modules: virtio_net.ko$"
if [ "$flavour" = generic ]; then
check "Linux's e1000 module loaded" "^dev modules: e1000.ko$"
check "Linux's ahci, sd_mod, sr_mod and isofs modules loaded" "^dev modules: isofs.ko$"
fi
if grep -q "^dev modules: FAIL" "$log"; then
  echo "full-boot: FAILED: a module did not load" >&2
  failed=1
fi
check "virtio-blk: Linux read vda's first MiB as the host wrote it" "^dev virtio-blk: vda read 1048576 bytes fnv1a64 $vda_sum$"
check "virtio-blk: Linux wrote and synced" "^dev virtio-blk: vda wrote 65536 bytes of pattern 131i\+7 at 1048576 and synced$"
if python3 -c 'import sys
data = open(sys.argv[1], "rb").read()[1 << 20:(1 << 20) + 65536]
sys.exit(0 if data == bytes((i * 131 + 7) & 0xff for i in range(65536)) else 1)' "$vda"; then
  echo "full-boot: ok: virtio-blk: the host finds the guest's pattern in the image"
else
  echo "full-boot: FAILED: virtio-blk: the guest's pattern is not in the image" >&2
  failed=1
fi
check "virtio-blk: Linux sees the ro disk read-only" "^dev virtio-blk: vdb ro flag 1$"
check "virtio-blk: the ro disk refuses a write (EPERM)" "^dev virtio-blk: vdb \(ro\) refused a write: errno 1$"
check "virtio-rnd: Linux's hwrng uses it" "^dev virtio-rnd: hwrng current virtio_rng"
check "virtio-rnd: bytes read from /dev/hwrng" "^dev virtio-rnd: read 32 bytes from /dev/hwrng: [0-9a-f]{64}$"
check "virtio-console: the host read the guest's line" "^host: virtio-console read: guest to host over port1$"
check "virtio-console: the guest read the host's line" "^dev virtio-console: read from port1: host to guest over port1$"
check "virtio-net: the guest's ping answered" "^dev virtio-net: ping 10.99.1.1: echo reply$"
check "virtio-net: the host's pings answered" "^host: ping 10.99.1.2: [1-3]/3 replies$"
guest_sent=$(sed -n 's/^dev virtio-net: sent 262144 bytes fnv1a64 \([0-9a-f]*\)$/\1/p' "$log")
guest_got=$(sed -n 's/^dev virtio-net: received 262144 bytes fnv1a64 \([0-9a-f]*\)$/\1/p' "$log")
check "virtio-net: TCP, guest to host, sums match" "^host: tcp received 262144 bytes fnv1a64 ${guest_sent:-none};"
check "virtio-net: TCP, host to guest, sums match" "^host: tcp .*; sent 262144 bytes fnv1a64 ${guest_got:-none}$"
if [ "$flavour" = generic ]; then
check "ahci-hd: Linux read sda's first MiB as the host wrote it" "^dev ahci-hd: sda read 1048576 bytes fnv1a64 $ahci_sum$"
check "ahci-hd: Linux wrote and synced" "^dev ahci-hd: sda wrote 65536 bytes of pattern 137i\+11 at 1048576 and synced$"
if python3 -c 'import sys
data = open(sys.argv[1], "rb").read()[1 << 20:(1 << 20) + 65536]
sys.exit(0 if data == bytes((i * 137 + 11) & 0xff for i in range(65536)) else 1)' "$ahci"; then
  echo "full-boot: ok: ahci-hd: the host finds the guest's pattern in the image"
else
  echo "full-boot: FAILED: ahci-hd: the guest's pattern is not in the image" >&2
  failed=1
fi
check "ahci-cd: Linux read the ISO from sr0 as the host made it" "^dev ahci-cd: sr0 read $iso_size bytes fnv1a64 $iso_sum$"
check "ahci-cd: isofs mounted it and read a file" "^dev ahci-cd: iso9660 hello.txt: rhyve ahci-cd$"
check "e1000: the guest's ping answered" "^dev e1000: ping 10.99.2.1: echo reply$"
check "e1000: the host's pings answered" "^host: e1000 ping 10.99.2.2: [1-3]/3 replies$"
e1000_sent=$(sed -n 's/^dev e1000: sent 262144 bytes fnv1a64 \([0-9a-f]*\)$/\1/p' "$log")
e1000_got=$(sed -n 's/^dev e1000: received 262144 bytes fnv1a64 \([0-9a-f]*\)$/\1/p' "$log")
check "e1000: TCP, guest to host, sums match" "^host: e1000 tcp received 262144 bytes fnv1a64 ${e1000_sent:-none};"
check "e1000: TCP, host to guest, sums match" "^host: e1000 tcp .*; sent 262144 bytes fnv1a64 ${e1000_got:-none}$"
fi
check "nvme: Linux's nvme driver read the controller's identity" "^dev nvme: nvme0 model bhyve-NVMe serial NVME-9-0$"
check "nvme: Linux read the disk's first MiB as the host wrote it" "^dev nvme: nvme0n1 read 1048576 bytes fnv1a64 $nvme_sum$"
check "nvme: Linux wrote and synced" "^dev nvme: nvme0n1 wrote 65536 bytes of pattern 61i\+3 at 1048576 and synced$"
check "nvme: Linux discarded a range" "^dev nvme: nvme0n1 discarded 65536 bytes at 1114112$"
if python3 -c 'import sys
data = open(sys.argv[1], "rb").read()
ok = data[1 << 20:(1 << 20) + 65536] == bytes((i * 61 + 3) & 0xff for i in range(65536))
ok = ok and data[(1 << 20) + 65536:(1 << 20) + 131072] == bytes(65536)
sys.exit(0 if ok else 1)' "$nvme"; then
  echo "full-boot: ok: nvme: the host finds the guest's pattern and the discarded range zeroed"
else
  echo "full-boot: FAILED: nvme: the image lacks the guest's pattern or the discard" >&2
  failed=1
fi
[ "$status" -eq 1 ] || { echo "full-boot: FAILED: expected exit status 1 (ACPI power-off), got $status" >&2; failed=1; }
[ "$failed" -eq 0 ] || exit 1
check "power button: Linux's button driver reported KEY_POWER" "^dev power-button: KEY_POWER pressed: powering off$"
[ "$status" -eq 1 ] || { echo "full-boot: FAILED: expected exit status 1 (ACPI power-off), got $status" >&2; failed=1; }
[ "$failed" -eq 0 ] || exit 1
echo "full-boot: OK with $cpus CPU(s), $flavour kernel"
