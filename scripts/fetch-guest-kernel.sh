#!/usr/bin/env bash
# Fetch one of Debian's kernels without installing it: apt-get download +
# dpkg -x. Prints the vmlinuz path, or with --elf the kernel's ELF image
# (vmlinux, with its PVH entry note), decompressed here on the host the way
# Linux's extract-vmlinux does, so a guest on a software-virtualization
# host need not decompress itself.
#   fetch-guest-kernel.sh [--generic] [--elf]
# Default: the cloud kernel (linux-image-cloud-amd64) into work/guest/.
# --generic: the generic kernel (linux-image-amd64) into
# work/guest-generic/; it builds as modules what the cloud one leaves out
# (ahci, libata, sd_mod, sr_mod, isofs, e1000, USB).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
meta=linux-image-cloud-amd64
dest="$root/work/guest"
if [ "${1:-}" = "--generic" ]; then
  meta=linux-image-amd64
  dest="$root/work/guest-generic"
  shift
fi
mkdir -p "$dest"
if ! ls "$dest"/kernel/boot/vmlinuz-* >/dev/null 2>&1; then
  cd "$dest"
  # The metapackage names the versioned kernel package it depends on.
  pkg=$(apt-cache depends $meta 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  if [ -z "$pkg" ]; then
    apt-get update -qq
    pkg=$(apt-cache depends $meta | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  fi
  rm -f ./*.deb
  apt-get download -qq "$pkg" 2>&1 | grep -v "^W: Download is performed unsandboxed" >&2 || true
  rm -rf kernel && dpkg -x ./*.deb kernel
  rm -f ./*.deb
fi
vmlinuz=$(ls "$dest"/kernel/boot/vmlinuz-* | head -n1)
if [ "${1:-}" != "--elf" ]; then
  echo "$vmlinuz"
  exit 0
fi
elf="$dest/vmlinux-$(basename "$vmlinuz" | sed 's/^vmlinuz-//')"
if [ ! -s "$elf" ]; then
  # The payload starts at the first magic of the compressor the kernel was
  # built with; the decompressor stops at its end (trailing data is fine).
  python3 - "$vmlinuz" "$elf" <<'PY'
import subprocess, sys
data = open(sys.argv[1], "rb").read()
for magic, cmd in ((b"\x02\x21\x4c\x18", ["lz4", "-dc"]), (b"\x28\xb5\x2f\xfd", ["zstd", "-dc"]),
                   (b"\xfd7zXZ\x00", ["xz", "-dc"]), (b"\x1f\x8b\x08", ["gzip", "-dc"])):
    at = data.find(magic)
    if at < 0:
        continue
    out = subprocess.run(cmd, input=data[at:], capture_output=True).stdout
    if out[:4] == b"\x7fELF":
        open(sys.argv[2], "wb").write(out)
        sys.exit(0)
sys.exit("no compressed ELF payload found in " + sys.argv[1])
PY
fi
echo "$elf"
