#!/usr/bin/env bash
# Install the Debian packages rhyve's build, tests and demo use.
# Idempotent: installs only what is missing. Needs root (or sudo) and apt.
set -euo pipefail

packages=(
  gcc               # guest test programs
  acpica-tools      # iasl -d judges every ACPI table we build
  busybox-static    # guest userland for initramfs images
  cpio              # initramfs archives
  user-mode-linux   # real Linux virtio drivers over vhost-user
  iproute2          # network namespaces and taps for virtio-net tests
  iputils-ping      # the host pings the full boot's guest
  e2fsprogs         # mkfs.ext4 for disk images
  dosfstools        # FAT images for grub-bhyve tests
  mtools            # filling FAT images without mounting
  xfsprogs          # XFS /boot images for grub-bhyve tests
  dmidecode         # decodes the SMBIOS tables we build
  xorriso           # ISO images for grub-bhyve tests
  grub-common       # grub-editenv judges the grubenv files grub-bhyve writes
  grub-efi-amd64-bin # Debian's GRUB EFI image the UEFI firmware boots (uefi_firmware test)
  python3-pip       # installs vncdotool, the VNC client of the uefi_vnc test (below)
  fdisk             # sfdisk for partitioned images
  kmod              # depmod/modinfo for guest modules
  lz4               # extracting the guest kernel's ELF image (Debian's is LZ4)
  zstd
  xz-utils
  systemd           # systemd-analyze verify checks the rhyve-vm@ unit
)

missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# PyPI: vncdotool, the VNC client that judges fbuf's server (uefi_vnc test).
if ! command -v vncdo >/dev/null 2>&1; then
  echo "setup: installing vncdotool (PyPI)"
  python3 -m pip install -q vncdotool 2>/dev/null \
    || python3 -m pip install -q --break-system-packages vncdotool
fi
