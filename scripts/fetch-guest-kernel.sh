#!/usr/bin/env bash
# Fetch Debian's cloud kernel (linux-image-cloud-amd64) without installing it:
# apt-get download + dpkg -x into work/guest/. Prints the vmlinuz path.
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
ls "$dest"/kernel/boot/vmlinuz-* | head -n1
