#!/usr/bin/env bash
# Build an initramfs for Linux guests:
#   build-initramfs.sh OUT INIT [--modules MODDIR NAME[,NAME...]]
# INIT (an executable: rhyve-guest-path linux-init, or a script whose
# interpreter the image must then hold) becomes /init, beside empty /proc,
# /sys and /dev; the kernel's built-in initramfs adds /dev/console.
# With --modules, the named modules of the kernel whose module tree is
# MODDIR (lib/modules/VERSION), those it has built in skipped, go to
# /modules with everything they depend on (modinfo's depends field, resolved here on the host), and
# /modules/order lists them in load order, dependencies first; their
# signatures are cut off (the kernel does not enforce them, and checking
# them costs minutes of emulated ring 0 on software-virtualization hosts).
# OUT ending in .cpio is left uncompressed (nothing to inflate in the guest).
set -euo pipefail
out="$1"
init="$2"
moddir=""
modules=""
if [ "${3:-}" = "--modules" ]; then
  moddir="${4:?--modules needs the module directory}"
  modules="${5:?--modules needs module names}"
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp"/{proc,sys,dev}
cp "$init" "$tmp/init"
chmod +x "$tmp/init"

if [ -n "$moddir" ]; then
  mkdir -p "$tmp/modules"
  declare -A seen=()
  order=()
  find_module() { # a module's file by name ('-' and '_' alike)
    local pattern
    pattern="$(echo "$1" | sed 's/[-_]/[-_]/g').ko"
    find "$moddir/kernel" -name "$pattern" | head -n1
  }
  builtin() { # the kernel has this module built in (modules.builtin)
    local pattern
    pattern="/$(echo "$1" | sed 's/[-_]/[-_]/g')\.ko$"
    [ -f "$moddir/modules.builtin" ] && grep -qE "$pattern" "$moddir/modules.builtin"
  }
  add_module() {
    local name="${1//-/_}" file dep
    [ -z "${seen[$name]:-}" ] || return 0
    seen[$name]=1
    # Built in: nothing to load (e.g. nvme in the cloud kernel, a module
    # in the generic one).
    ! builtin "$1" || return 0
    file="$(find_module "$1")"
    [ -n "$file" ] || { echo "build-initramfs: no module $1 under $moddir" >&2; exit 1; }
    for dep in $(modinfo -F depends "$file" | tr ',' ' '); do
      add_module "$dep"
    done
    order+=("$(basename "$file")")
    strip_signature "$file" "$tmp/modules/$(basename "$file")"
  }
  strip_signature() { # copy SRC to DST without an appended signature
    python3 - "$1" "$2" <<'PY'
import struct, sys
data = open(sys.argv[1], "rb").read()
marker = b"~Module signature appended~\n"
if data.endswith(marker):
    # struct module_signature (12 bytes) precedes the marker; its last
    # field is the signature's length, big-endian.
    sig_len = struct.unpack(">I", data[-len(marker) - 4:-len(marker)])[0]
    data = data[:len(data) - len(marker) - 12 - sig_len]
open(sys.argv[2], "wb").write(data)
PY
  }
  for m in ${modules//,/ }; do
    add_module "$m"
  done
  printf '%s\n' "${order[@]}" > "$tmp/modules/order"
fi

if [ "${out%.cpio}" != "$out" ]; then
  (cd "$tmp" && find . | cpio -o -H newc --quiet) > "$out"
else
  (cd "$tmp" && find . | cpio -o -H newc --quiet | gzip -1) > "$out"
fi
