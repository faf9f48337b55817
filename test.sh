#!/usr/bin/env bash
# rhyve's whole test suite: what README.md tells you to run and .ci/run runs.
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -c /dev/kvm ]; then
  echo "test.sh: /dev/kvm is missing: rhyve's VM tests need KVM and are never skipped" >&2
  exit 1
fi
scripts/setup.sh
host_kind=$(scripts/host-kind.sh)
echo "test.sh: host: $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo), $host_kind"

# The long emulated boots, planned per host kind (README.md "What runs
# where"). The full boot's kernel: Debian's generic one lets Linux judge
# every device (AHCI disk and CD and e1000 too) but boots about twice as
# long as the cloud one, which has no AHCI or e1000 driver. The firmware's
# VNC test is a third firmware boot that the slow host kinds leave out.
case "$host_kind" in
  pvm-amd | pvm-other) boot_kernel=cloud vnc_boot=no ;;
  *) boot_kernel=generic vnc_boot=yes ;;
esac
boot_kernel="${RHYVE_FULL_BOOT_KERNEL:-$boot_kernel}"
firmware_test=bhyve_uefi_firmware_keeps_variables_and_boots_grub_and_linux
vnc_test=a_vnc_client_sees_and_types_into_the_uefi_shell
echo "test.sh: plan for $host_kind (README.md \"What runs where\"):"
echo "  - the full Linux boot (scripts/full-boot.sh 1 $boot_kernel --checkpoint-restore): Linux's"
echo "    drivers on every device its kernel has drivers for, checkpointed during its initcalls,"
echo "    killed and restored in a new bhyve; one core, started first"
echo "  - the UEFI firmware test (uefi_firmware: shell, variables across a reset and a new run,"
echo "    fw_cfg, GRUB to Linux's early boot), started as soon as the build is done"
if [ "$vnc_boot" = yes ]; then
  echo "  - the firmware's VNC test (uefi_vnc), once the full boot is done"
else
  echo "  - not the firmware's VNC test (uefi_vnc): a third firmware boot, too long on $host_kind"
fi
echo "  - every other cargo test beside them; all but the full boot at nice 19, so it keeps a core"
echo "  expected, build done: ~20 min on Intel PVM hosts, ~35-40 on AMD PVM hosts"
export RHYVE_GUEST_KERNEL="${RHYVE_GUEST_KERNEL:-$(scripts/fetch-guest-kernel.sh)}"

mkdir -p work
full_boot_out=work/full-boot-suite.out
full_boot_done=work/full-boot-suite.done
rm -f "$full_boot_done"
(rc=0
 scripts/full-boot.sh 1 "$boot_kernel" --checkpoint-restore >"$full_boot_out" 2>&1 || rc=$?
 touch "$full_boot_done"
 exit "$rc") &
full_boot=$!
jobs_to_stop=("$full_boot")
trap 'kill "${jobs_to_stop[@]}" 2>/dev/null; pkill -KILL -f "^bhyve: fullboot1" 2>/dev/null || true' EXIT
# It builds and prepares what it boots itself: let it do so on an idle
# machine, until its VM runs (or the script ends, failing).
while kill -0 "$full_boot" 2>/dev/null && ! pgrep -f "^bhyve: fullboot1" >/dev/null; do
  sleep 1
done

# The path of a built test binary of rhyve-cli (cargo runs them from the
# package's directory; so does run_cli_test).
cli_test_binary() {
  cargo test -p rhyve-cli --test "$1" --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])' "$1"
}
# At the cargo tests' priority: sharing a core fairly with them, not
# starving their timing-sensitive guests.
run_cli_test() { # run_cli_test BINARY TEST OUTPUT
  (cd crates/cli && nice -n 19 "$1" --exact "$2" --nocapture) >"$3" 2>&1
}
report() { # report NAME OUTPUT STATUS
  if [ "$3" -eq 0 ]; then
    echo "test.sh: ok: $1 (output in $2)"
  else
    tail -n 60 "$2"
    echo "test.sh: FAILED: $1 (output in $2)" >&2
  fi
}

status=0
nice -n 19 cargo build --workspace --all-targets || status=$?
firmware_status=1 vnc_status=1
firmware_out=work/uefi-firmware-suite.out vnc_out=work/uefi-vnc-suite.out
if [ "$status" -eq 0 ]; then
  run_cli_test "$(cli_test_binary uefi_firmware)" "$firmware_test" "$firmware_out" &
  firmware=$!
  jobs_to_stop+=("$firmware")
  if [ "$vnc_boot" = yes ]; then
    vnc_binary=$(cli_test_binary uefi_vnc)
    # After the full boot, on the core it frees.
    (while [ ! -e "$full_boot_done" ]; do sleep 5; done
     run_cli_test "$vnc_binary" "$vnc_test" "$vnc_out") &
    vnc=$!
    jobs_to_stop+=("$vnc")
  fi
  nice -n 19 cargo test --workspace --no-fail-fast -- --skip "$firmware_test" --skip "$vnc_test" || status=$?
  echo "test.sh: waiting for the UEFI firmware test (output in $firmware_out)"
  firmware_status=0
  wait "$firmware" || firmware_status=$?
  report "the UEFI firmware test (uefi_firmware)" "$firmware_out" "$firmware_status"
  [ "$firmware_status" -eq 0 ] || status=1
  if [ "$vnc_boot" = yes ]; then
    echo "test.sh: waiting for the firmware's VNC test (output in $vnc_out)"
    vnc_status=0
    wait "$vnc" || vnc_status=$?
    report "the firmware's VNC test (uefi_vnc)" "$vnc_out" "$vnc_status"
    [ "$vnc_status" -eq 0 ] || status=1
  fi
fi

echo "test.sh: waiting for the full Linux boot (scripts/full-boot.sh 1 $boot_kernel --checkpoint-restore, output in $full_boot_out)"
if wait "$full_boot"; then
  grep -E "^(rhyve full-boot guest|pci |BOOT-OK|dev |host: |DRIVERS-DONE|bhyve exited|full-boot: )" "$full_boot_out"
else
  tail -n 40 "$full_boot_out"
  echo "test.sh: FAILED: the full Linux boot (scripts/full-boot.sh 1 $boot_kernel --checkpoint-restore)" >&2
  status=1
fi
trap - EXIT
exit "$status"
