#!/usr/bin/env bash
# Fetch Debian's cloud kernel (linux-image-cloud-amd64) without installing it:
# apt-get download + dpkg -x into work/guest/. Prints the vmlinuz path, or
# with --elf the kernel's ELF image (vmlinux, with its PVH entry note),
# decompressed here on the host the way Linux's extract-vmlinux does, so a
# guest on a software-virtualization host need not decompress itself.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/work/guest"
mkdir -p "$dest"
if ! ls "$dest"/kernel/boot/vmlinuz-* >/dev/null 2>&1; then
  cd "$dest"
  # The metapackage names the versioned kernel package it depends on.
  pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  if [ -z "$pkg" ]; then
    apt-get update -qq
    pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
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
