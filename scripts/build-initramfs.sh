#!/usr/bin/env bash
# Build a busybox initramfs for Linux guests: OUT [INIT-SCRIPT]
# OUT ending in .cpio is left uncompressed (nothing to inflate in the guest).
# The default /init mounts /proc, prints BOOT-OK with the uptime and powers
# the VM off through ACPI.
set -euo pipefail
out="$1"
init_script="${2:-}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp"/{bin,sbin,proc,sys,dev,etc,tmp,root}
cp /bin/busybox "$tmp/bin/busybox"
for applet in $("$tmp/bin/busybox" --list); do
  [ "$applet" = busybox ] && continue
  ln -sf busybox "$tmp/bin/$applet"
done
if [ -n "$init_script" ]; then
  cp "$init_script" "$tmp/init"
else
  cat > "$tmp/init" <<'INIT'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "rhyve demo guest: $(uname -sr), $(grep -c ^processor /proc/cpuinfo) CPU(s)"
echo "BOOT-OK uptime $(cat /proc/uptime)"
poweroff -f
INIT
fi
chmod +x "$tmp/init"
if [ "${out%.cpio}" != "$out" ]; then
  (cd "$tmp" && find . | cpio -o -H newc --quiet) > "$out"
else
  (cd "$tmp" && find . | cpio -o -H newc --quiet | gzip -1) > "$out"
fi
