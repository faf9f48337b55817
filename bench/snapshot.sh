#!/usr/bin/env bash
# Snapshot figures (issue 15, item 3): for a 256 MiB and a 2 GiB guest, the
# time bhyvectl --checkpoint and --suspend take, the memory file's size and
# what it really occupies (zero pages are holes), and the time bhyve -r
# takes from start to the restored machine (RUST_LOG=info line) and to the
# guest's next line on COM1.
#
# The guest is our snapcheck (crates/guests/guest/snapcheck.c) with a long
# run of rounds: it keeps stirring 16 KiB of memory and writing virtio-blk
# sectors while it is saved, so the figures include pausing the vCPUs and
# draining virtio-blk. Its memory is mostly untouched, as a freshly booted
# small guest's is; the Linux full boot (scripts/full-boot.sh
# --checkpoint-restore) prints the same figures for a kernel in the middle
# of its initcalls.
#
#   bench/snapshot.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q --release --bin bhyve --bin bhyvectl
guest="$(cargo run -q --release -p rhyve-guests --bin rhyve-guest-path -- snapcheck)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export RHYVE_VMM_DIR="$work/vmm"
ms() { date +%s%N | cut -b1-13; }
wait_line() { # wait_line FILE PATTERN [after N lines]
  for _ in $(seq 1 3000); do
    if tail -n +"${3:-1}" "$1" | tr -d '\r' | grep -q -- "$2"; then return 0; fi
    sleep 0.01
  done
  echo "bench: no '$2' in $1" >&2; return 1
}
printf '%-6s %10s %10s %12s %12s %14s %14s\n' memory checkpoint suspend file on-disk restore-build first-line
for mem in 256M 2G; do
  disk="$work/disk.img"; truncate -s 1M "$disk"
  snap="$work/snap-$mem"
  args=(-m "$mem" -s 0,hostbridge -s 31,lpc -l com1,stdio -s 4,virtio-blk,"$disk"
        -o boot.kernel="$guest" -o boot.cmdline=rounds=100000000)
  RUST_LOG=info ./target/release/bhyve "${args[@]}" "bench$mem" > "$work/run.out" 2> "$work/run.err" &
  pid=$!
  wait_line "$work/run.out" "snapcheck round 10$"
  t0=$(ms)
  ./target/release/bhyvectl --vm="bench$mem" --checkpoint="$snap.ckp" || { cat "$work/run.err"; exit 1; }
  t1=$(ms)
  ./target/release/bhyvectl --vm="bench$mem" --suspend="$snap" || { cat "$work/run.err"; exit 1; }
  t2=$(ms)
  wait "$pid" || true
  size=$(stat -c %s "$snap"); used=$(( $(stat -c %b "$snap") * 512 ))
  lines=$(wc -l < "$work/run.out")
  t3=$(ms)
  RUST_LOG=info ./target/release/bhyve -r "$snap" "${args[@]}" >> "$work/run.out" 2> "$work/restore.err" &
  pid=$!
  wait_line "$work/run.out" "snapcheck round" $((lines + 1))
  t4=$(ms)
  kill "$pid"; wait "$pid" 2>/dev/null || true
  restored=$(sed -n 's/.*restored in \(.*\)$/\1/p' "$work/restore.err")
  printf '%-6s %8s ms %8s ms %9s MiB %9s KiB %14s %11s ms\n' "$mem" $((t1 - t0)) $((t2 - t1)) \
    $((size >> 20)) $((used >> 10)) "$restored" $((t4 - t3))
  ./target/release/bhyvectl --vm="bench$mem" --destroy 2>/dev/null || true
  rm -f "$snap"* "$disk"
done
