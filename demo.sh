#!/usr/bin/env bash
# Build rhyve and boot the demo guest: Debian's cloud kernel with a busybox
# initramfs, 2 vCPUs, 512 MiB, console on COM1 (stdio).
#
# The guest's /init prints BOOT-OK and powers off (bhyve exit status 1).
# On hardware KVM that takes seconds. On a software-virtualization host
# (PVM) every guest ring-0 instruction is emulated: Linux's boot log scrolls
# for about 25 minutes up to /init, whose first system call that host
# cannot deliver (see README.md; Ctrl-C stops it).
set -euo pipefail
cd "$(dirname "$0")"
exec scripts/full-boot.sh "${1:-2}"
