#!/usr/bin/env bash
# Snapshot figures (issue 15, item 3): for a 256 MiB and a 2 GiB guest, rhyve
# and QEMU (microvm, -enable-kvm) side by side on the same guest in one run:
# the time to checkpoint (save and run on) and to suspend (save and end),
# the memory file's size and what it really occupies on disk, and the
# restore: from starting the VMM to the restored machine and to the
# guest's next line on COM1.
#
# The guest is bench/stub-guest.S built with -DTOUCH_MIB=$TOUCH_MIB: it
# fills that much memory with a non-zero pattern, then writes a line to COM1
# every few milliseconds, so both VMMs save the same memory contents.
#
#   rhyve: bhyvectl --checkpoint=FILE (the VM runs on), bhyvectl
#     --suspend=FILE (bhyve exits), bhyve -r FILE; "restored" is bhyve's own
#     "restored in" line (building the machine from the files; guest RAM is
#     mapped privately and read lazily, on first touch).
#   QEMU: a QMP socket; migrate-set-parameters max-bandwidth to 1 TiB/s (its
#     default throttles migration to a file); checkpoint = migrate
#     "exec:cat > FILE" on the running VM until query-migrate says
#     completed, then cont (QEMU leaves the VM paused after a migration);
#     suspend = stop, migrate until completed, quit. Restore = a new QEMU with
#     -incoming "exec:cat FILE", and cont once the stream is read (it carries
#     the stopped state); "restored" is process start to query-status
#     "running" (QEMU reads the whole stream before it runs the guest).
#   "first line" is, for both, process start to the guest's next COM1 line.
#   The two "restored" figures measure different spans, so they get no ratio.
#
#   bench/snapshot.sh            (TOUCH_MIB=32 by default)
#
# One run on an Intel PVM host (pvm-intel), 2026-12-03, load average 3.4-3.6
# from other jobs (two earlier runs differed by up to 3x in the save times;
# README's Performance section has the ranges and Firecracker's figures):
#
#   memory vmm    checkpoint    suspend       file     on-disk   restored  first-line
#   256M   rhyve      309 ms      83 ms    256 MiB      32 MiB    13.8 ms       45 ms
#   256M   QEMU        81 ms      44 ms     32 MiB      32 MiB     148 ms      148 ms
#   256M   ratio       3.81x      1.89x      7.85x       0.98x          -       0.30x
#   2G     rhyve      724 ms     750 ms   2048 MiB      32 MiB     5.8 ms      116 ms
#   2G     QEMU       238 ms     131 ms     36 MiB      36 MiB     154 ms      161 ms
#   2G     ratio       3.04x      5.73x     56.01x       0.88x          -       0.72x
#
# Needs qemu-system-x86 (scripts/setup.sh does not install it: it is for
# comparison only), gcc, python3.
set -euo pipefail
cd "$(dirname "$0")/.."
TOUCH_MIB=${TOUCH_MIB:-32}
qemu=$(command -v qemu-system-x86_64) ||
  { echo "bench: qemu-system-x86_64 is missing (apt-get install qemu-system-x86)" >&2; exit 1; }
cargo build -q --release --bin bhyve --bin bhyvectl
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
guest="$work/touch.elf"
gcc -DTOUCH_MIB="$TOUCH_MIB" -nostdlib -static -no-pie -Wl,--build-id=none \
  -Wl,-T,bench/stub-guest.ld -o "$guest" bench/stub-guest.S
export RHYVE_VMM_DIR="$work/vmm"
line="rhyve-bench: guest up"
ms() { date +%s%N | cut -b1-13; }
wait_line() { # wait_line FILE PATTERN [after N lines]
  for _ in $(seq 1 6000); do
    if tail -n +"${3:-1}" "$1" | tr -d '\r' | grep -q -- "$2"; then return 0; fi
    sleep 0.005
  done
  echo "bench: no '$2' in $1" >&2; return 1
}

rhyve() { # rhyve MEM: prints checkpoint suspend size used restored first-line (ms, bytes)
  local mem=$1 snap="$work/rhyve-$1" t0 t1 t2 t3 t4 pid lines size used restored
  local args=(-m "$mem" -s 0,hostbridge -s 31,lpc -l com1,stdio -o boot.kernel="$guest")
  RUST_LOG=info ./target/release/bhyve "${args[@]}" "bench$mem" > "$work/run.out" 2> "$work/run.err" &
  pid=$!
  wait_line "$work/run.out" "$line"
  t0=$(ms)
  ./target/release/bhyvectl --vm="bench$mem" --checkpoint="$snap.ckp" >&2 || { cat "$work/run.err" >&2; exit 1; }
  t1=$(ms)
  ./target/release/bhyvectl --vm="bench$mem" --suspend="$snap" >&2 || { cat "$work/run.err" >&2; exit 1; }
  t2=$(ms)
  wait "$pid" || true
  size=$(stat -c %s "$snap"); used=$(( $(stat -c %b "$snap") * 512 ))
  lines=$(wc -l < "$work/run.out")
  t3=$(ms)
  RUST_LOG=info ./target/release/bhyve -r "$snap" "${args[@]}" >> "$work/run.out" 2> "$work/restore.err" &
  pid=$!
  wait_line "$work/run.out" "$line" $((lines + 1))
  t4=$(ms)
  kill "$pid"; wait "$pid" 2>/dev/null || true
  restored=$(sed -n 's/.*restored in \(.*\)$/\1/p' "$work/restore.err" |
    awk '/ms$/ {printf "%.1f\n", $0; next} /µs$/ {printf "%.1f\n", $0 / 1000; next} /s$/ {printf "%.1f\n", $0 * 1000}')
  ./target/release/bhyvectl --vm="bench$mem" --destroy 2>/dev/null || true
  rm -f "$snap"*
  echo $((t1 - t0)) $((t2 - t1)) "$size" "$used" "$restored" $((t4 - t3))
}

qemu() { # qemu MEM: the same figures for QEMU microvm
  python3 - "$qemu" "$guest" "$1" "$work" "$line" <<'PY'
import atexit, json, os, socket, subprocess, sys, time
qemu, guest, mem, work, line = sys.argv[1:]
started = []
atexit.register(lambda: [p.kill() for p in started if p.poll() is None])  # no QEMU left on failure
snap = os.path.join(work, f"qemu-{mem}")

class Qmp:
    def __init__(self, path, deadline=30):
        end = time.monotonic() + deadline
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX); self.s.connect(path); break
            except OSError:
                if time.monotonic() > end: raise
                time.sleep(0.001)
        self.f = self.s.makefile("rw")
        self.f.readline()  # greeting
        self.cmd("qmp_capabilities")
    def cmd(self, name, **args):
        self.f.write(json.dumps({"execute": name, "arguments": args}) + "\n"); self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "event" in r: continue
            if "error" in r: sys.exit(f"bench: QEMU {name}: {r['error']}")
            return r["return"]

def start(serial, extra):
    sock = os.path.join(work, "qmp.sock")
    if os.path.exists(sock): os.unlink(sock)
    p = subprocess.Popen([qemu, "-M", "microvm", "-enable-kvm", "-m", mem, "-nodefaults",
                          "-no-user-config", "-display", "none", "-serial", f"file:{serial}",
                          "-qmp", f"unix:{sock},server=on,wait=off", "-kernel", guest, *extra],
                         stdin=subprocess.DEVNULL)
    started.append(p)
    return p, Qmp(sock)

def lines(path):
    try:
        with open(path, "rb") as f: return f.read().count(line.encode())
    except FileNotFoundError: return 0

def wait_for(cond, what, deadline=60):
    end = time.monotonic() + deadline
    while not cond():
        if time.monotonic() > end: sys.exit(f"bench: QEMU: no {what}")
        time.sleep(0.001)

def migrate(q, path):
    q.cmd("migrate", uri=f"exec:cat > {path}")
    def done():
        s = q.cmd("query-migrate").get("status")
        if s in ("failed", "cancelled"): sys.exit(f"bench: QEMU migrate {s}")
        return s == "completed"
    wait_for(done, "completed migration")

serial = os.path.join(work, "qemu-run.out")
p, q = start(serial, [])
wait_for(lambda: lines(serial) > 0, "guest line")
q.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
t0 = time.perf_counter()
migrate(q, snap + ".ckp")
q.cmd("cont")
t1 = time.perf_counter()
q.cmd("stop")
migrate(q, snap)
q.cmd("quit")
t2 = time.perf_counter()
p.wait()
st = os.stat(snap)

serial = os.path.join(work, "qemu-restore.out")
t3 = time.perf_counter()
p, q = start(serial, ["-incoming", f"exec:cat {snap}"])
# The stream carries the source's run state: saved stopped, it stays paused.
wait_for(lambda: q.cmd("query-status")["status"] != "inmigrate", "end of the incoming migration")
if q.cmd("query-status")["status"] == "paused":
    q.cmd("cont")
wait_for(lambda: q.cmd("query-status")["status"] == "running", "running state")
t4 = time.perf_counter()
wait_for(lambda: lines(serial) > 0, "guest line after restore")
t5 = time.perf_counter()
q.cmd("quit"); p.wait()
for f in (snap, snap + ".ckp"): os.unlink(f)
ms = lambda a, b: round((b - a) * 1000)
print(ms(t0, t1), ms(t1, t2), st.st_size, st.st_blocks * 512, ms(t3, t4), ms(t3, t5))
PY
}

printf '%-6s %-6s %10s %10s %10s %11s %10s %11s\n' memory vmm checkpoint suspend file on-disk restored first-line
for mem in 256M 2G; do
  read -r rc rs rsize rused rrest rline < <(rhyve "$mem")
  read -r qc qs qsize qused qrest qline < <(qemu "$mem")
  printf '%-6s %-6s %7s ms %7s ms %6s MiB %7s MiB %7s ms %8s ms\n' \
    "$mem" rhyve "$rc" "$rs" $((rsize >> 20)) $((rused >> 20)) "$rrest" "$rline" \
    "$mem" QEMU "$qc" "$qs" $((qsize >> 20)) $((qused >> 20)) "$qrest" "$qline"
  awk -v m="$mem" -v a="$rc $rs $rsize $rused $rrest $rline" -v b="$qc $qs $qsize $qused $qrest $qline" '
    BEGIN { n = split(a, x); split(b, y); printf "%-6s %-6s", m, "ratio"
      w[1] = 10; w[2] = 10; w[3] = 10; w[4] = 11; w[5] = 10; w[6] = 11
      for (i = 1; i <= n; i++) printf " %*s", w[i], (i != 5 && y[i] > 0 ? sprintf("%.2fx", x[i] / y[i]) : "-")
      print "" }'
done
