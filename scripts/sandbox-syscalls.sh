#!/bin/sh
# Lists the system calls each thread role of a running `bhyve` makes, from
# `strace -ff` of a few guest runs, to build and check the sandbox's
# allow-lists (crates/sandbox/src/roles.rs). A thread's role is read from the
# name std gives it (prctl PR_SET_NAME); the main thread (renamed to its
# process title, "bhyve: NAME") is the supervisor, whose calls count from
# its first thread creation on (the runs use -o security.sandbox=false, so
# that is the first device thread: an over-estimate of what the supervisor
# does after set-up, to be read with the code).
# Usage: scripts/sandbox-syscalls.sh [TARGET_DIR]   (default: ./target)
set -eu
target=${1:-target}
bhyve=$target/debug/bhyve
out=$(ls -d "$target"/debug/build/rhyve-guests-*/out | head -1)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export RHYVE_VMM_DIR="$work/vmm"
disk="$work/disk.img"
head -c 1048576 /dev/zero > "$disk"
run() { # tag, strace-then-bhyve arguments
    tag=$1; shift
    mkdir -p "$work/$tag"
    timeout 60 strace -qq -f -ff -o "$work/$tag/t" "$bhyve" -o security.sandbox=false "$@" "sbx-$tag" </dev/null >/dev/null 2>&1 || true
}
base="-s 0,hostbridge -s 31,lpc -l com1,stdio"
run blk -o boot.kernel="$out/virtioblk.elf" $base -s "4,virtio-blk,$disk"
run ahci -o boot.kernel="$out/pcienum.elf" $base -s "3,ahci-hd,$disk" -s 5,virtio-rnd
run smp -c 2 -o boot.kernel="$out/smp.elf" $base
# SIGTERM presses the power button once the guest enabled ACPI.
mkdir -p "$work/pb"
strace -qq -f -ff -o "$work/pb/t" "$bhyve" -o security.sandbox=false \
    -o boot.kernel="$out/powerbutton.elf" $base sbx-pb </dev/null >/dev/null 2>&1 &
tracer=$!
sleep 5
kill -TERM "$(pgrep -P "$tracer")" 2>/dev/null || true
wait "$tracer" || true
for f in "$work"/*/t.*; do
    role=$(grep -o 'PR_SET_NAME, "[^"]*"' "$f" | head -1 | sed 's/.*"\(.*\)"/\1/' | sed 's/ [0-9]*$//')
    case $role in ""|bhyve:*) role=main ;; esac
    if [ "$role" = main ]; then
        sed -n '/clone3\|clone(/,$p' "$f"
    else
        sed -n '/PR_SET_NAME/,$p' "$f"
    fi | grep -o '^[a-z_0-9]*(' | tr -d '(' | sed "s/^/$role /"
done | sort -u | awk '{a[$1]=a[$1]" "$2} END {for (r in a) print r ":" a[r]}' | sort
