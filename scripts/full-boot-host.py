#!/usr/bin/env python3
"""The host's side of the full boot's driver checks (scripts/full-boot.sh).

Runs the bhyve command given after "--" (inside the network namespace this
script was started in), copies the guest's console to stdout and plays the
host for the guest's /init (crates/guests/linux-init/init.c):

  - gives the VM's tap the host address 10.99.1.1/24 and serves TCP on port
    5555: takes 256 KiB from the guest, sends 256 KiB back, and reports the
    FNV-1a 64 sums of both;
  - pings the guest (10.99.1.2) once its /init says eth0 is up;
  - the same on the e1000's tap (--e1000-tap), 10.99.2.1 and 10.99.2.2,
    eth1 in the guest;
  - connects to the virtio-console port's socket, reads the guest's line
    and answers with one of its own;
  - presses the ACPI power button (SIGTERM to bhyve) when /init waits for
    it;
  - with --checkpoint-at TEXT --checkpoint FILE: once a console line
    contains TEXT, checkpoints the VM (bhyvectl --checkpoint=FILE), kills
    bhyve (SIGKILL) and restores the snapshot in a new bhyve (the same
    command with -r FILE), which the rest of the checks then run against.

Its own lines start with "host: "; it exits with bhyve's status.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

FNV_START = 0xCBF29CE484222325


def fnv1a64(h, data):
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def say(text):
    sys.stdout.write(f"host: {text}\n")
    sys.stdout.flush()


def configure_tap(tap, net, deadline):
    while time.time() < deadline:
        if subprocess.run(["ip", "link", "show", tap], capture_output=True).returncode == 0:
            subprocess.run(["ip", "addr", "add", f"10.99.{net}.1/24", "dev", tap], check=True)
            subprocess.run(["ip", "link", "set", tap, "up"], check=True)
            return True
        time.sleep(0.2)
    say(f"tap {tap} never appeared")
    return False


def serve_tcp(server, label):
    conn, _ = server.accept()
    with conn:
        conn.settimeout(600)
        got = bytearray()
        while len(got) < 262144:
            chunk = conn.recv(65536)
            if not chunk:
                break
            got += chunk
        sent = bytes((i * 31 + 5) & 0xFF for i in range(262144))
        conn.sendall(sent)
        say(
            f"{label}tcp received {len(got)} bytes fnv1a64 {fnv1a64(FNV_START, got):016x}; "
            f"sent {len(sent)} bytes fnv1a64 {fnv1a64(FNV_START, sent):016x}"
        )


def console_port(path, deadline):
    got = b""
    # A restored bhyve listens on a new socket at the same path: connect
    # again when the first one closes before the guest's line.
    while not got.endswith(b"\n"):
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
        except OSError:
            if time.time() > deadline:
                say(f"no console socket at {path}")
                return
            time.sleep(0.2)
            continue
        # The guest writes its line only once its drivers are up: on a slow,
        # busy host that can be well over half an hour after the VM starts.
        s.settimeout(max(deadline - time.time(), 1))
        got = b""
        while not got.endswith(b"\n"):
            try:
                chunk = s.recv(256)
            except OSError:  # a killed bhyve resets the connection
                chunk = b""
            if not chunk:
                time.sleep(0.5)
                break
            got += chunk
    say(f"virtio-console read: {got.decode(errors='replace').strip()}")
    s.sendall(b"host to guest over port1\n")
    # Keep the connection open until the VM ends.
    threading.Event().wait()


def checkpoint_and_restore(vm, cmd, path, nics):
    """Checkpoint the running VM to `path`, kill its bhyve and start a new
    one restoring the checkpoint; returns the new process."""
    bhyvectl = os.path.join(os.path.dirname(cmd[0]), "bhyvectl")
    name = cmd[-1]
    start = time.time()
    ctl = subprocess.run([bhyvectl, f"--vm={name}", f"--checkpoint={path}"],
                         capture_output=True, text=True)
    if ctl.returncode != 0:
        say(f"checkpoint failed: {ctl.stderr.strip()}")
        return vm
    saved = time.time() - start
    vm.kill()
    vm.wait()
    size = os.path.getsize(path)
    used = os.stat(path).st_blocks * 512
    say(f"checkpointed in {saved:.2f} s ({size >> 20} MiB of memory, {used >> 20} MiB on disk), bhyve killed")
    vm = subprocess.Popen(cmd[:-1] + ["-r", path, name], stdout=subprocess.PIPE,
                          stdin=subprocess.DEVNULL)
    say("restoring the checkpoint in a new bhyve")
    # The killed bhyve's taps went with it: the new ones get the addresses.
    for tap, net, _, _ in nics:
        threading.Thread(target=configure_tap, args=(tap, net, time.time() + 60), daemon=True).start()
    return vm


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tap", required=True)
    ap.add_argument("--e1000-tap")
    ap.add_argument("--console-socket", required=True)
    ap.add_argument("--checkpoint-at")
    ap.add_argument("--checkpoint")
    ap.add_argument("bhyve", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = args.bhyve[1:] if args.bhyve[:1] == ["--"] else args.bhyve
    deadline = time.time() + 7200

    vm = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    checkpoint_at = args.checkpoint_at
    threading.Thread(target=console_port, args=(args.console_socket, deadline), daemon=True).start()
    # (tap, subnet, what the guest says when its interface is up, label)
    nics = [(args.tap, 1, "dev virtio-net: eth0 10.99.1.2/24 up", "")]
    if args.e1000_tap:
        nics.append((args.e1000_tap, 2, "dev e1000: eth1 10.99.2.2/24 up", "e1000 "))
    for tap, net, _, label in nics:
        if configure_tap(tap, net, time.time() + 60):
            server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            server.bind((f"10.99.{net}.1", 5555))
            server.listen(1)
            threading.Thread(target=serve_tcp, args=(server, label), daemon=True).start()

    while True:
        raw = vm.stdout.readline()
        if not raw:
            break
        sys.stdout.buffer.write(raw)
        sys.stdout.flush()
        text = raw.decode(errors="replace").strip()
        if checkpoint_at and checkpoint_at in text:
            checkpoint_at = None
            vm = checkpoint_and_restore(vm, cmd, args.checkpoint, nics)
            continue
        for _, net, up, label in nics:
            if text.startswith(up):
                guest = f"10.99.{net}.2"
                ping = subprocess.run(
                    ["ping", "-c", "3", "-W", "5", guest], capture_output=True, text=True
                )
                replies = sum(1 for l in ping.stdout.splitlines() if f"bytes from {guest}" in l)
                say(f"{label}ping {guest}: {replies}/3 replies")
        if text.startswith("dev power-button: waiting"):
            vm.send_signal(signal.SIGTERM)
            say("pressed the power button (SIGTERM to bhyve)")
    sys.exit(vm.wait())


if __name__ == "__main__":
    main()
