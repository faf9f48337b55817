#!/usr/bin/env bash
# Build bhyve's UEFI firmware (EDK2 OvmfPkg/Bhyve/BhyveX64.dsc, what FreeBSD's
# sysutils/bhyve-firmware installs) from Debian's edk2 source package, into a
# cache outside the clone, and print the paths of the images:
#
#   <cache>/BHYVE_UEFI_CODE.fd   the code, for -l bootrom,CODE (FreeBSD's BHYVE_UEFI.fd)
#   <cache>/BHYVE_UEFI_VARS.fd   the empty variable store template, copy it per VM
#
# The cache is $RHYVE_FIRMWARE_DIR if set, else /var/cache/rhyve/firmware for
# root, else ${XDG_CACHE_HOME:-~/.cache}/rhyve/firmware. An existing build is
# reused; a missing one is rebuilt (about 3.5 minutes of CPU). Nothing is
# fetched but Debian packages: the source comes from `apt-get source edk2`
# (a deb-src entry for bookworm is added when apt knows no edk2 source).
# Progress goes to stderr, the two paths to stdout, one a line.
set -euo pipefail

log() { echo "build-uefi-firmware: $*" >&2; }

if [ -n "${RHYVE_FIRMWARE_DIR:-}" ]; then
  cache="$RHYVE_FIRMWARE_DIR"
elif [ "$(id -u)" -eq 0 ]; then
  cache=/var/cache/rhyve/firmware
else
  cache="${XDG_CACHE_HOME:-$HOME/.cache}/rhyve/firmware"
fi
code="$cache/BHYVE_UEFI_CODE.fd"
vars="$cache/BHYVE_UEFI_VARS.fd"

print_paths() { printf '%s\n%s\n' "$code" "$vars"; }

mkdir -p "$cache"
# One build at a time: a second caller waits and then finds the images.
exec 9>"$cache/.lock"
flock 9
if [ -s "$code" ] && [ -s "$vars" ]; then
  print_paths
  exit 0
fi

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# Build dependencies for the X64 firmware alone (edk2's Build-Depends also
# pull cross compilers and QEMU, which this build does not use).
deps=(build-essential dpkg-dev nasm acpica-tools uuid-dev python3 python3-distutils)
missing=()
for p in "${deps[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done

if ! apt-cache showsrc edk2 2>/dev/null | grep -q '^Package: edk2'; then
  log "adding a deb-src entry for Debian bookworm"
  $SUDO tee /etc/apt/sources.list.d/rhyve-bookworm-src.sources >/dev/null <<'EOF'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  $SUDO apt-get update -qq
fi
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

work="$cache/build"
rm -rf "$work"
mkdir -p "$work"
cd "$work"
log "fetching and unpacking Debian's edk2 source"
apt-get source -q edk2 >&2
src=$(find . -maxdepth 1 -type d -name 'edk2-*' | head -n1)
[ -n "$src" ] || { log "apt-get source edk2 unpacked no edk2-* directory"; exit 1; }
cd "$src"

# Debian's Disable-the-Shell-when-SecureBoot-is-enabled patch makes the shell
# need SecureBootVariableLib (and PlatformPKProtectionLib under it), which
# BhyveX64.dsc maps only when SECURE_BOOT_ENABLE is set; Debian never builds
# the Bhyve platform so it never noticed. Map both for the default (no Secure
# Boot) build too, which keeps FreeBSD's feature set.
python3 - OvmfPkg/Bhyve/BhyveX64.dsc <<'EOF'
import sys
path = sys.argv[1]
data = open(path, newline="").read()
null = "  AuthVariableLib|MdeModulePkg/Library/AuthVariableLibNull/AuthVariableLibNull.inf\r\n"
extra = ("  SecureBootVariableLib|SecurityPkg/Library/SecureBootVariableLib/SecureBootVariableLib.inf\r\n"
         "  PlatformPKProtectionLib|SecurityPkg/Library/PlatformPKProtectionLibVarPolicy/PlatformPKProtectionLibVarPolicy.inf\r\n")
if data.count(null) != 1:
    sys.exit("BhyveX64.dsc: expected exactly one AuthVariableLibNull mapping, the fix no longer fits this edk2")
if null + extra not in data:
    data = data.replace(null, null + extra)
    open(path, "w", newline="").write(data)
EOF

log "building BaseTools and BhyveX64 (a few minutes)"
jobs=$(nproc)
(
  unset WORKSPACE EDK_TOOLS_PATH CONF_PATH
  export PYTHON3_ENABLE=TRUE
  # edksetup.sh reads unset variables.
  set +u
  . ./edksetup.sh >/dev/null
  make -C BaseTools ARCH=X64 -j"$jobs" >"$work/basetools.log" 2>&1 ||
    { tail -n 30 "$work/basetools.log" >&2; exit 1; }
  build -a X64 -t GCC5 -p OvmfPkg/Bhyve/BhyveX64.dsc -b RELEASE -n "$jobs" >"$work/build.log" 2>&1 ||
    { tail -n 30 "$work/build.log" >&2; exit 1; }
)

fv=Build/BhyveX64/RELEASE_GCC5/FV
install -m 0644 "$fv/BHYVE_VARS.fd" "$vars.tmp"
install -m 0644 "$fv/BHYVE_CODE.fd" "$code.tmp"
dpkg-parsechangelog -S Version >"$cache/VERSION"
mv "$vars.tmp" "$vars"
mv "$code.tmp" "$code"
cd "$cache"
rm -rf "$work"
log "built from edk2 $(cat "$cache/VERSION")"
print_paths
