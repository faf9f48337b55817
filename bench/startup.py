#!/usr/bin/env python3
"""Start-up benchmark: rhyve against QEMU microvm, side by side in one run.

A stub guest (stub-guest.S) writes one line to COM1 and leaves through
isa-debug-exit. For each VMM we time process start -> the line on stdout and
process start -> exit, and measure the VMM's own resident memory (all
mappings but guest RAM) with a variant of the guest that spins after the
line. Medians of N runs, runs interleaved so machine noise hits both alike.

Usage: bench/startup.py [--runs N] [--markdown]
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUEST_MEM_MIB = 128
LINE = b"rhyve-bench: guest up"


def build_guests(tmp):
    out = {}
    for name, extra in (("exit", []), ("spin", ["-DSPIN"])):
        path = os.path.join(tmp, f"stub-{name}.elf")
        subprocess.run(
            ["gcc", *extra, "-nostdlib", "-static", "-no-pie", "-Wl,--build-id=none",
             "-Wl,-T," + os.path.join(ROOT, "bench", "stub-guest.ld"),
             "-o", path, os.path.join(ROOT, "bench", "stub-guest.S")],
            check=True)
        out[name] = path
    return out


def rhyve_cmd(bhyve, guest):
    return [bhyve, "-m", f"{GUEST_MEM_MIB}M", "-s", "0,hostbridge", "-s", "31,lpc",
            "-l", "com1,stdio", "-l", "pc-testdev", "-o", f"boot.kernel={guest}", "bench"]


def qemu_cmd(qemu, guest):
    return [qemu, "-M", "microvm", "-enable-kvm", "-m", f"{GUEST_MEM_MIB}M", "-nodefaults",
            "-no-user-config", "-nographic", "-serial", "stdio",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-kernel", guest]


def time_run(cmd):
    """(ms to the guest's line, ms to exit, exit status)."""
    start = time.perf_counter()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL)
    seen = b""
    t_line = None
    while True:
        chunk = os.read(p.stdout.fileno(), 4096)
        if not chunk:
            break
        seen += chunk
        if t_line is None and LINE in seen:
            t_line = time.perf_counter()
    status = p.wait()
    end = time.perf_counter()
    if t_line is None:
        raise RuntimeError(f"{cmd[0]}: no guest line (status {status}): {seen[-200:]!r}")
    return (t_line - start) * 1e3, (end - start) * 1e3, status


def own_rss_mib(pid):
    """Resident memory of every mapping except guest RAM (MiB)."""
    total = guest = 0
    size = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            parts = line.split()
            if parts[0] == "Size:":
                size = int(parts[1])
            elif parts[0] == "Rss:":
                rss = int(parts[1])
                total += rss
                # Guest RAM: one anonymous mapping of the guest's size (QEMU
                # may add alignment, so allow a few MiB of slack).
                if GUEST_MEM_MIB * 1024 <= size <= (GUEST_MEM_MIB + 4) * 1024:
                    guest += rss
    return (total - guest) / 1024.0


def memory_run(cmd):
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL)
    seen = b""
    try:
        while LINE not in seen:
            chunk = os.read(p.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError(f"{cmd[0]}: exited before the guest line")
            seen += chunk
        time.sleep(0.2)
        return own_rss_mib(p.pid)
    finally:
        p.kill()
        p.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    bhyve = os.path.join(ROOT, "target", "release", "bhyve")
    subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "bhyve"], cwd=ROOT, check=True)
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        sys.exit("startup.py: qemu-system-x86_64 is missing (apt-get install qemu-system-x86)")
    with tempfile.TemporaryDirectory() as tmp:
        guests = build_guests(tmp)
        vmms = {"rhyve": lambda g: rhyve_cmd(bhyve, g), "qemu microvm": lambda g: qemu_cmd(qemu, g)}
        results = {name: {"line": [], "exit": [], "rss": []} for name in vmms}
        for _ in range(args.runs):
            for name, cmd in vmms.items():
                line_ms, exit_ms, _ = time_run(cmd(guests["exit"]))
                results[name]["line"].append(line_ms)
                results[name]["exit"].append(exit_ms)
                results[name]["rss"].append(memory_run(cmd(guests["spin"])))
    med = {n: {k: statistics.median(v) for k, v in r.items()} for n, r in results.items()}
    r, q = med["rhyve"], med["qemu microvm"]
    rows = [("start to guest line (ms)", "line", "{:.1f}"),
            ("start to exit (ms)", "exit", "{:.1f}"),
            ("VMM resident memory, guest RAM excluded (MiB)", "rss", "{:.2f}")]
    print(f"Medians of {args.runs} interleaved runs, {GUEST_MEM_MIB} MiB guest, {os.uname().release}")
    if args.markdown:
        print("\n| measure | rhyve | QEMU microvm | rhyve / QEMU |\n|---|---|---|---|")
        for label, key, fmt in rows:
            print(f"| {label} | {fmt.format(r[key])} | {fmt.format(q[key])} | {r[key] / q[key]:.2f}x |")
    else:
        for label, key, fmt in rows:
            print(f"{label:48} rhyve {fmt.format(r[key]):>8}  qemu {fmt.format(q[key]):>8}  ratio {r[key] / q[key]:.2f}x")


if __name__ == "__main__":
    main()
