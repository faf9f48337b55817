#!/bin/sh
# Block back end throughput: measurement, not a test.
#
# The same vhost-user front-end (examples/blk_bench.rs, queue depth 32)
# drives rhyve's virtio-blk backend and qemu-storage-daemon's
# vhost-user-blk export over the same 1 GiB image; rhyve's NVMe controller
# is driven in-process by the spec-written host driver of its tests
# (crates/storage/examples/nvme_bench.rs, one queue pair, queue depth 32,
# sleeping on its MSI-X vector); fio (io_uring, QD 32) does the same reads
# on the host file. virtio-blk, NVMe and AHCI share one back end (BlockQueue).
# Sequential 1 MiB reads and random 4 KiB reads, ROUNDS rounds of SECONDS
# each, the backends interleaved in every round; prints medians and
# ratios. All read through the host page cache (the image is warmed first).
# BASELINE=DIR adds a row for DIR/rhyve-vhost-user (an older build) in the
# same rounds, for before/after comparisons under the same load.
#
# Needs: fio, qemu-system-common (qemu-storage-daemon), python3.
set -eu
ROUNDS=${ROUNDS:-3}
SECONDS_PER_TEST=${SECONDS_PER_TEST:-3}
DIR=${BENCH_DIR:-/tmp/rhyve-blk-bench}
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$DIR"
img=$DIR/disk.img
size=$((1 << 30))
[ -f "$img" ] || dd if=/dev/urandom of="$img" bs=1M count=1024 status=none
cat "$img" > /dev/null

(cd "$here" && cargo build -q --release -p rhyve-cli --bin rhyve-vhost-user && cargo build -q --release -p rhyve-virtio --example blk_bench && cargo build -q --release -p rhyve-storage --example nvme_bench)
target=$(cd "$here" && cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
vu=$target/release/rhyve-vhost-user
drv=$target/release/examples/blk_bench
nvme=$target/release/examples/nvme_bench

out=$DIR/results.txt
: > "$out"
vhost_user() { # vhost_user BINARY LABEL: one round of blk_bench against it
    rm -f "$DIR/ours.sock"
    "$1" --socket "$DIR/ours.sock" "virtio-blk,$img,ro" 2>/dev/null &
    pid=$!
    while [ ! -S "$DIR/ours.sock" ]; do sleep 0.05; done
    "$drv" --socket "$DIR/ours.sock" --size $size --seconds "$SECONDS_PER_TEST" | sed "s/^/$2 /" >> "$out"
    kill $pid; wait $pid 2>/dev/null || true
}
for round in $(seq "$ROUNDS"); do
    rm -f "$DIR/qsd.sock"
    vhost_user "$vu" rhyve
    if [ -n "${BASELINE:-}" ]; then
        vhost_user "$BASELINE/rhyve-vhost-user" base
    fi
    "$nvme" --disk "$img" --seconds "$SECONDS_PER_TEST" | sed 's/^/nvme /' >> "$out"

    qemu-storage-daemon \
        --blockdev "driver=file,node-name=disk,filename=$img,read-only=on,aio=io_uring" \
        --export "type=vhost-user-blk,id=exp,node-name=disk,addr.type=unix,addr.path=$DIR/qsd.sock" 2>/dev/null &
    pid=$!
    while [ ! -S "$DIR/qsd.sock" ]; do sleep 0.05; done
    "$drv" --socket "$DIR/qsd.sock" --size $size --seconds "$SECONDS_PER_TEST" | sed 's/^/qsd /' >> "$out"
    kill $pid; wait $pid 2>/dev/null || true

    for t in seq-1m:read:1M rand-4k:randread:4k; do
        name=${t%%:*}; rest=${t#*:}; rw=${rest%%:*}; bs=${rest#*:}
        fio --name=b --filename="$img" --readonly --rw="$rw" --bs="$bs" --iodepth=32 \
            --ioengine=io_uring --runtime="$SECONDS_PER_TEST" --time_based \
            --output-format=json 2>/dev/null |
            python3 -c "import json,sys; r=json.load(sys.stdin)['jobs'][0]['read']; print('host $name %.1f %.0f' % (r['bw_bytes']/1e6, r['iops']))" >> "$out"
    done
done

python3 - "$out" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
med = {}
for who, test, mbps, iops in rows:
    med.setdefault((who, test), []).append((float(mbps), float(iops)))
for k, v in med.items():
    med[k] = (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v))
print(f"{'test':8} {'backend':6} {'MB/s':>9} {'IOPS':>9}")
for test in ("seq-1m", "rand-4k"):
    for who in ("host", "base", "rhyve", "nvme", "qsd"):
        m = med.get((who, test))
        if m:
            print(f"{test:8} {who:6} {m[0]:9.1f} {m[1]:9.0f}")
    q = med.get(("qsd", test))
    ratios = [f"{w}/qsd {med[(w, test)][0] / q[0]:.2f}x"
              for w in ("rhyve", "nvme", "base", "host") if q and (w, test) in med]
    if ("base", test) in med and ("rhyve", test) in med:
        ratios.append(f"rhyve/base {med[('rhyve', test)][0] / med[('base', test)][0]:.2f}x")
    print(f"{test:8} " + "   ".join(ratios))
PY
