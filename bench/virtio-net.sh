#!/bin/sh
# virtio-net throughput through a tap: measurement, not a test (root).
#
# rhyve's virtio-net backend serves vhost-user in a scratch network
# namespace whose tap (rtap0, 10.99.0.1) is the host side; the front-end
# (examples/net_bench.rs) sends 1400-byte UDP datagrams through the TX
# queue to a socket on 10.99.0.1, then receives datagrams the host side
# sends to 10.99.0.2 (a static neighbour entry for the device's MAC).
# Prints the median of ROUNDS rounds per direction.
set -eu
ROUNDS=${ROUNDS:-3}
SECONDS_PER_TEST=${SECONDS_PER_TEST:-3}
here=$(cd "$(dirname "$0")/.." && pwd)
ns=rhyve-netbench-$$
mac=00:a0:98:00:00:42
dir=$(mktemp -d)
cleanup() { ip netns del "$ns" 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT

(cd "$here" && cargo build -q --release -p rhyve-cli --bin rhyve-vhost-user && cargo build -q --release -p rhyve-virtio --example net_bench)
target=$(cd "$here" && cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')

ip netns add "$ns"
ip -n "$ns" link set lo up
ip -n "$ns" tuntap add dev rtap0 mode tap
ip -n "$ns" addr add 10.99.0.1/24 dev rtap0
ip -n "$ns" link set rtap0 up
ip -n "$ns" neigh add 10.99.0.2 lladdr $mac dev rtap0 nud permanent
tap_mac=$(ip netns exec "$ns" cat /sys/class/net/rtap0/address)

for round in $(seq "$ROUNDS"); do
    rm -f "$dir/net.sock"
    ip netns exec "$ns" "$target/release/rhyve-vhost-user" \
        --socket "$dir/net.sock" "virtio-net,rtap0,mac=$mac" 2>/dev/null &
    pid=$!
    while [ ! -S "$dir/net.sock" ]; do sleep 0.05; done
    ip netns exec "$ns" "$target/release/examples/net_bench" --socket "$dir/net.sock" \
        --tap-mac "$tap_mac" --mac $mac --seconds "$SECONDS_PER_TEST" >> "$dir/results.txt"
    kill $pid; wait $pid 2>/dev/null || true
done
python3 - "$dir/results.txt" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
for test in ("tx-udp", "rx-udp"):
    v = [(float(m), float(p)) for t, m, p in rows if t == test]
    if v:
        print(f"{test}: {statistics.median(x[0] for x in v):.0f} Mbit/s, "
              f"{statistics.median(x[1] for x in v):.0f} packets/s (median of {len(v)})")
PY
