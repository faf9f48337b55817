#!/usr/bin/env bash
# Build rhyve and boot the demo guest: Debian's cloud kernel with a tiny
# /init (crates/guests/linux-init), 2 vCPUs, 256 MiB, console on COM1.
#
# The guest's /init mounts /proc, prints BOOT-OK with the uptime and powers
# off (bhyve exit status 1). On hardware KVM that takes seconds. On a
# software-virtualization host (PVM) every guest ring-0 instruction is
# emulated and Linux's boot log scrolls for tens of minutes first (see
# README.md; Ctrl-C stops it).
set -euo pipefail
cd "$(dirname "$0")"
exec scripts/full-boot.sh "${1:-2}"
