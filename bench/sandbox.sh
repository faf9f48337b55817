#!/bin/sh
# The sandbox's cost: measurement, not a test.
#
# Runs, interleaved, with -o security.sandbox=true and =false on the same
# release bhyve:
#   - the exitloop guest: EXITS reads of an unassigned I/O port, each an
#     exit to bhyve and back (the vCPU thread's filter is on that path);
#   - the virtioblk guest with reads=N: 4 KiB reads at random offsets of a
#     64 MiB image, queue depth 1, completion polled (the device worker's
#     filter and the vCPU's notify path).
# Both are timed inside the guest with the ACPI PM timer. Prints the median
# of ROUNDS rounds per setting.
set -eu
ROUNDS=${ROUNDS:-5}
EXITS=${EXITS:-200000}
READS=${READS:-20000}
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
cargo build -q --release --bin bhyve
exitloop=$(cargo run -q --release -p rhyve-guests --bin rhyve-guest-path -- exitloop)
virtioblk=$(cargo run -q --release -p rhyve-guests --bin rhyve-guest-path -- virtioblk)
target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
bhyve=$target/release/bhyve
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
export RHYVE_VMM_DIR="$dir/vmm"
img=$dir/disk.img
head -c $((64 << 20)) /dev/urandom > "$img"
base="-s 0,hostbridge -s 31,lpc -l com1,stdio"
for round in $(seq "$ROUNDS"); do
    for sandbox in true false; do
        "$bhyve" -o security.sandbox=$sandbox -o boot.kernel="$exitloop" \
            -o boot.cmdline=exits=$EXITS $base bench-exits </dev/null |
            sed -n "s/^exitloop exits \([0-9]*\) ticks \([0-9]*\)/exit $sandbox \1 \2/p"
        "$bhyve" -o security.sandbox=$sandbox -o boot.kernel="$virtioblk" \
            -o boot.cmdline=reads=$READS $base -s "4,virtio-blk,$img" bench-blk </dev/null |
            sed -n "s/^virtio-blk reads \([0-9]*\) ticks \([0-9]*\)/blk $sandbox \1 \2/p"
    done
done > "$dir/results"
python3 - "$dir/results" <<'PY'
import statistics, sys
HZ = 3579545
rows = [l.split() for l in open(sys.argv[1])]
def med(kind, sandbox):
    return statistics.median(int(t) / int(n) for k, s, n, t in rows if k == kind and s == sandbox)
exit_on, exit_off = (med("exit", s) * 1e9 / HZ for s in ("true", "false"))
iops_on, iops_off = (HZ / med("blk", s) for s in ("true", "false"))
print(f"exit round trip (ns):        sandbox on {exit_on:8.0f}   off {exit_off:8.0f}   on/off {exit_on / exit_off:.3f}")
print(f"virtio-blk 4K random reads:  sandbox on {iops_on:8.0f}   off {iops_off:8.0f}   on/off {iops_on / iops_off:.3f}  (IOPS, QD1)")
PY
