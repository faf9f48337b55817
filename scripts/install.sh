#!/usr/bin/env bash
# Install rhyve where the systemd unit, vmrun.sh and the README expect it,
# or remove exactly what an earlier install put there.
#
#   scripts/install.sh [--prefix DIR] [--from DIR]     (default /usr/local)
#   scripts/install.sh --uninstall [--prefix DIR]
#
# Installs, with DIR the prefix:
#   DIR/bin/{bhyve,bhyvectl,grub-bhyve,rhyve-vhost-user,rhyve-jailer}
#   DIR/share/rhyve/vmrun.sh                 (bhyve's example script)
#   DIR/lib/systemd/system/rhyve-vm@.service (systemd reads /usr/local/lib/
#                                             systemd/system; run
#                                             `systemctl daemon-reload`)
#   DIR/share/rhyve/install-manifest         (what --uninstall removes)
# with vmrun.sh and the unit pointing at DIR. The binaries are built with
# `cargo build --release` unless --from names a directory that holds them.
# --uninstall removes the files the manifest lists, and nothing else.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
prefix=/usr/local
from=""
uninstall=0
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix="${2:?--prefix needs a directory}"; shift 2 ;;
    --prefix=*) prefix="${1#--prefix=}"; shift ;;
    --from) from="${2:?--from needs a directory}"; shift 2 ;;
    --from=*) from="${1#--from=}"; shift ;;
    --uninstall) uninstall=1; shift ;;
    -h | --help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install.sh: unknown argument \"$1\" (see --help)" >&2; exit 1 ;;
  esac
done
case "$prefix" in
  /*) ;;
  *) echo "install.sh: --prefix must be an absolute path: \"$prefix\"" >&2; exit 1 ;;
esac
manifest="$prefix/share/rhyve/install-manifest"
binaries=(bhyve bhyvectl grub-bhyve rhyve-vhost-user rhyve-jailer)

if [ "$uninstall" -eq 1 ]; then
  if [ ! -f "$manifest" ]; then
    echo "install.sh: nothing to uninstall: no $manifest" >&2
    exit 1
  fi
  while IFS= read -r file; do
    case "$file" in
      "$prefix"/*) rm -f -- "$file" ;;
      *) echo "install.sh: $manifest lists $file, outside $prefix: left alone" >&2 ;;
    esac
  done < "$manifest"
  rm -f -- "$manifest"
  rmdir -- "$prefix/share/rhyve" "$prefix/lib/systemd/system" "$prefix/lib/systemd" 2>/dev/null || true
  echo "install.sh: removed rhyve from $prefix"
  exit 0
fi

if [ -z "$from" ]; then
  (cd "$root" && cargo build --release --bins -p rhyve-cli)
  from="$root/target/release"
fi
for b in "${binaries[@]}"; do
  [ -x "$from/$b" ] || { echo "install.sh: $from/$b is missing" >&2; exit 1; }
done

installed=()
put() { # put SOURCE DEST MODE: install one file, remember it
  install -D -m "$3" -- "$1" "$2"
  installed+=("$2")
}
for b in "${binaries[@]}"; do
  put "$from/$b" "$prefix/bin/$b" 0755
done
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# vmrun.sh finds the binaries through these defaults (still overridable).
sed -e "s|^BHYVE=\${BHYVE:-bhyve}|BHYVE=\${BHYVE:-$prefix/bin/bhyve}|" \
    -e "s|^BHYVECTL=\${BHYVECTL:-bhyvectl}|BHYVECTL=\${BHYVECTL:-$prefix/bin/bhyvectl}|" \
    -e "s|^GRUB_BHYVE=\${GRUB_BHYVE:-grub-bhyve}|GRUB_BHYVE=\${GRUB_BHYVE:-$prefix/bin/grub-bhyve}|" \
    "$root/share/examples/bhyve/vmrun.sh" > "$tmp/vmrun.sh"
put "$tmp/vmrun.sh" "$prefix/share/rhyve/vmrun.sh" 0755
sed -e "s|/usr/local/|$prefix/|g" "$root/share/systemd/rhyve-vm@.service" > "$tmp/unit"
put "$tmp/unit" "$prefix/lib/systemd/system/rhyve-vm@.service" 0644
printf '%s\n' "${installed[@]}" > "$manifest"
echo "install.sh: installed rhyve in $prefix (remove with: scripts/install.sh --uninstall --prefix $prefix)"
