#!/usr/bin/env bash
# Which kind of KVM host this is, for planning the suite's long emulated
# boots (README.md "What runs where"): prints one word,
#   pvm-intel | pvm-amd | pvm-other   software virtualization (kvm_pvm):
#                                     guest ring 0 emulated, ~560 ns (Intel)
#                                     or ~1400 ns (AMD) per instruction
#   hardware                          hardware KVM
set -euo pipefail
vendor=$(awk -F': ' '/^vendor_id/ {print $2; exit}' /proc/cpuinfo)
if [ -d /sys/module/kvm_pvm ]; then
  case "$vendor" in
    GenuineIntel) echo pvm-intel ;;
    AuthenticAMD | HygonGenuine) echo pvm-amd ;;
    *) echo pvm-other ;;
  esac
else
  echo hardware
fi
