#!/usr/bin/env bash
# Build an initramfs for Linux guests: OUT INIT
# INIT (an executable: rhyve-guest-path linux-init, or a script whose
# interpreter the image must then hold) becomes /init, beside empty /proc,
# /sys and /dev; the kernel's built-in initramfs adds /dev/console.
# OUT ending in .cpio is left uncompressed (nothing to inflate in the guest).
set -euo pipefail
out="$1"
init="$2"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp"/{proc,sys,dev}
cp "$init" "$tmp/init"
chmod +x "$tmp/init"
if [ "${out%.cpio}" != "$out" ]; then
  (cd "$tmp" && find . | cpio -o -H newc --quiet) > "$out"
else
  (cd "$tmp" && find . | cpio -o -H newc --quiet | gzip -1) > "$out"
fi
