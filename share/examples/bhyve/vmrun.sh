#!/bin/sh
#
# vmrun.sh for rhyve: bhyve's example wrapper (share/examples/bhyve/vmrun.sh)
# with its options and its restart loop, on Linux. The loader is grub-bhyve
# (bhyveload needs FreeBSD's userboot), none with -k (direct kernel boot),
# or bhyve's UEFI firmware with -E (as scripts/build-uefi-firmware.sh
# builds it, or the one -f names).
#
# Exit status: bhyve's last status. 0 (reset) loops and boots again; 1
# (power-off) and 2 (halt) destroy the VM and exit; 3 (triple fault) and
# errors exit and leave the VM for inspection.

BHYVE=${BHYVE:-bhyve}
BHYVECTL=${BHYVECTL:-bhyvectl}
GRUB_BHYVE=${GRUB_BHYVE:-grub-bhyve}

DEFAULT_MEMSIZE=512M
DEFAULT_CPUS=2
DEFAULT_TAPDEV=tap0
DEFAULT_CONSOLE=stdio
DEFAULT_NIC=virtio-net
DEFAULT_VIRTIO_DISK="./diskdev"
DEFAULT_ISOFILE="./release.iso"
DEFAULT_VNCHOST="127.0.0.1"
DEFAULT_VNCPORT=5900
DEFAULT_VNCSIZE="w=1024,h=768"
DEFAULT_FIRMWARE="${RHYVE_FIRMWARE_DIR:-/var/cache/rhyve/firmware}/BHYVE_UEFI_CODE.fd"

errmsg() {
	echo "*** $1"
}

usage() {
	msg=$1
	echo "Usage: vmrun.sh [-aAEhiTuvw] [-c <CPUs>] [-C <console>]"
	echo "                [-d <disk file>[,<opts>]] [-e <name=value>] [-f <path of firmware>]"
	echo "                [-F <size>] [-G [w][<addr>:]<port>]"
	echo "                [-I <location of installation iso>] [-L <VNC IP for UEFI framebuffer>]"
	echo "                [-m <memsize>] [-P <port>]"
	echo "                [-n <network adapter emulation type>] [-p <pcidev|bus/slot/func>]"
	echo "                [-t <tapdev>] [-k <kernel> [-K <cmdline>] [-r <initrd>]] <vmname>"
	echo ""
	echo "       -h: display this help message"
	echo "       -a: force memory mapped local APIC access"
	echo "       -A: use AHCI disk emulation instead of virtio"
	echo "       -c: number of virtual cpus (default: ${DEFAULT_CPUS})"
	echo "       -C: console device (default: ${DEFAULT_CONSOLE})"
	echo "       -d: virtio diskdev file (default: ${DEFAULT_VIRTIO_DISK})"
	echo "       -e: set a loader environment variable (bhyveload only: not supported)"
	echo "       -E: Use UEFI mode"
	echo "       -f: Use a specific UEFI firmware (default: ${DEFAULT_FIRMWARE})"
	echo "       -F: Use a custom UEFI GOP framebuffer size (default: ${DEFAULT_VNCSIZE})"
	echo "       -G: bind the GDB stub to the specified address and port"
	echo "       -i: force boot of the Installation CDROM image"
	echo "       -I: Installation CDROM image location (default: ${DEFAULT_ISOFILE})"
	echo "       -k: boot this Linux kernel directly (rhyve; no loader)"
	echo "       -K: kernel command line for -k"
	echo "       -L: IP address for UEFI GOP VNC server (default: ${DEFAULT_VNCHOST})"
	echo "       -m: memory size (default: ${DEFAULT_MEMSIZE})"
	echo "       -n: network adapter emulation type (default: ${DEFAULT_NIC})"
	echo "       -p: pass-through a host PCI device (e.g. ppt0 or 10/0/0)"
	echo "       -P: UEFI GOP VNC port (default: ${DEFAULT_VNCPORT})"
	echo "       -r: initrd for -k"
	echo "       -t: tap device for virtio-net (default: $DEFAULT_TAPDEV)"
	echo "       -T: Enable tablet device (for UEFI GOP)"
	echo "       -u: RTC keeps UTC time"
	echo "       -v: Wait for VNC client connection before booting VM"
	echo "       -w: ignore unimplemented MSRs"
	echo ""
	[ -n "$msg" ] && errmsg "$msg"
	exit 1
}

if [ "$(id -u)" -ne 0 ]; then
	errmsg "This script must be executed with superuser privileges"
	exit 1
fi

if [ ! -c /dev/kvm ]; then
	errmsg "/dev/kvm is missing: is the kvm module loaded?"
	exit 1
fi

force_install=0
isofile=${DEFAULT_ISOFILE}
memsize=${DEFAULT_MEMSIZE}
console=${DEFAULT_CONSOLE}
cpus=${DEFAULT_CPUS}
nic=${DEFAULT_NIC}
tap_total=0
disk_total=0
disk_emulation="virtio-blk"
apic_opt=""
gdbport=""
bhyverun_opt="-H -P"
pass_total=0
kernel=""
kernel_cmdline=""
initrd=""

# UEFI-specific options
efi_mode=0
efi_firmware="${DEFAULT_FIRMWARE}"
vncwait=""
vnchost=${DEFAULT_VNCHOST}
vncport=${DEFAULT_VNCPORT}
vncsize=${DEFAULT_VNCSIZE}
tablet=""

while getopts aAc:C:d:e:Ef:F:G:hiI:k:K:L:m:n:p:P:r:t:Tuvw c ; do
	case $c in
	a) apic_opt="-a" ;;
	A) disk_emulation="ahci-hd" ;;
	c) cpus=${OPTARG} ;;
	C) console=${OPTARG} ;;
	d)
		disk_dev=${OPTARG%%,*}
		disk_opts=${OPTARG#"${disk_dev}"}
		eval "disk_dev${disk_total}=\"\${disk_dev}\""
		eval "disk_opts${disk_total}=\"\${disk_opts}\""
		disk_total=$((disk_total + 1))
		;;
	e) usage "loader environment variables (-e) need bhyveload, which is not supported" ;;
	E) efi_mode=1 ;;
	f) efi_firmware=${OPTARG} ;;
	F) vncsize=${OPTARG} ;;
	G) gdbport=${OPTARG} ;;
	i) force_install=1 ;;
	I) isofile=${OPTARG} ;;
	k) kernel=${OPTARG} ;;
	K) kernel_cmdline=${OPTARG} ;;
	L) vnchost=${OPTARG} ;;
	m) memsize=${OPTARG} ;;
	n) nic=${OPTARG} ;;
	p)
		eval "pass_dev${pass_total}=\"\${OPTARG}\""
		pass_total=$((pass_total + 1))
		;;
	P) vncport=${OPTARG} ;;
	r) initrd=${OPTARG} ;;
	t)
		eval "tap_dev${tap_total}=\"\${OPTARG}\""
		tap_total=$((tap_total + 1))
		;;
	T) tablet="-s 30,xhci,tablet" ;;
	u) bhyverun_opt="${bhyverun_opt} -u" ;;
	v) vncwait=",wait" ;;
	w) bhyverun_opt="${bhyverun_opt} -w" ;;
	*) usage ;;
	esac
done

if [ $tap_total -eq 0 ] ; then
	tap_total=1
	tap_dev0="${DEFAULT_TAPDEV}"
fi
if [ $disk_total -eq 0 ] ; then
	disk_total=1
	disk_dev0="${DEFAULT_VIRTIO_DISK}"
fi

shift $((OPTIND - 1))

if [ $# -ne 1 ]; then
	usage "virtual machine name not specified"
fi

vmname="$1"

if [ ${efi_mode} -gt 0 ]; then
	if [ -n "$kernel" ]; then
		usage "-E and -k are two ways to boot: give one"
	fi
	if [ ! -f "${efi_firmware}" ]; then
		echo "Error: EFI Firmware ${efi_firmware} doesn't exist." \
		    "Try: scripts/build-uefi-firmware.sh"
		exit 1
	fi
fi

make_and_check_diskdev()
{
	virtio_diskdev="$1"
	# Create the virtio diskdev file if needed
	if [ ! -e "${virtio_diskdev}" ]; then
		echo "virtio disk device file \"${virtio_diskdev}\" does not exist."
		echo "Creating it ..."
		truncate -s 8G "${virtio_diskdev}" > /dev/null
	fi
	if [ ! -r "${virtio_diskdev}" ]; then
		echo "virtio disk device file \"${virtio_diskdev}\" is not readable"
		exit 1
	fi
	if [ ! -w "${virtio_diskdev}" ]; then
		echo "virtio disk device file \"${virtio_diskdev}\" is not writable"
		exit 1
	fi
}

# A disk with an MBR boot signature has something to boot (bhyve's script
# asks file(1) for a boot sector).
has_boot_sector()
{
	[ -r "$1" ] && [ "$(dd if="$1" bs=1 skip=510 count=2 2>/dev/null | od -An -tx1 | tr -d ' \n')" = "55aa" ]
}

# systemd (or anyone) stopping us: bhyve presses the guest's power button on
# SIGTERM; the loop ends once the guest is off.
stopping=0
trap 'stopping=1' TERM INT

echo "Launching virtual machine \"$vmname\" ..."

first_diskdev="$disk_dev0"
devmap=$(mktemp "${TMPDIR:-/tmp}/vmrun-device.map.XXXXXX")
trap 'rm -f "$devmap"' EXIT

${BHYVECTL} --vm="${vmname}" --destroy > /dev/null 2>&1

while true; do
	installer_opt=""
	boot_opt=""
	if [ -n "$kernel" ]; then
		boot_opt="-o boot.kernel=${kernel}"
		[ -n "$initrd" ] && boot_opt="${boot_opt} -o boot.initrd=${initrd}"
	elif [ ${efi_mode} -gt 0 ]; then
		# The firmware finds the boot loader itself: the installer CD
		# is attached when the first disk has nothing to boot.
		if [ $force_install -eq 1 ] || ! has_boot_sector "${first_diskdev}"; then
			if [ ! -r "${isofile}" ]; then
				echo "Installation CDROM image \"${isofile}\" is not readable"
				exit 1
			fi
			installer_opt="-s 31:0,ahci-cd,${isofile}"
		fi
	else
		if [ $force_install -eq 1 ] || ! has_boot_sector "${first_diskdev}"; then
			if [ ! -r "${isofile}" ]; then
				echo "Installation CDROM image \"${isofile}\" is not readable"
				exit 1
			fi
			root="cd0"
			installer_opt="-s 31:0,ahci-cd,${isofile}"
		else
			root="hd0,msdos1"
		fi
		: > "$devmap"
		i=0
		while [ $i -lt $disk_total ] ; do
			eval "disk=\$disk_dev${i}"
			[ -r "${disk}" ] && echo "(hd${i}) ${disk}" >> "$devmap"
			i=$((i + 1))
		done
		echo "(cd0) ${isofile}" >> "$devmap"
		cons_opt=""
		[ "${console}" != "stdio" ] && cons_opt="-c ${console}"
		# shellcheck disable=SC2086
		${GRUB_BHYVE} -m "$devmap" -r "$root" -M "${memsize}" ${cons_opt} "${vmname}"
		bhyve_exit=$?
		if [ $bhyve_exit -ne 0 ]; then
			break
		fi
	fi

	# Build up args for additional tap and disk devices now.
	nextslot=2  # slot 0 is hostbridge, slot 1 is lpc
	devargs=""  # accumulate disk/tap args here
	i=0
	while [ $i -lt $tap_total ] ; do
		eval "tapname=\$tap_dev${i}"
		devargs="$devargs -s $nextslot:0,${nic},${tapname} "
		nextslot=$((nextslot + 1))
		i=$((i + 1))
	done

	i=0
	while [ $i -lt $disk_total ] ; do
		eval "disk=\$disk_dev${i}"
		eval "opts=\$disk_opts${i}"
		make_and_check_diskdev "${disk}"
		devargs="$devargs -s $nextslot:0,${disk_emulation},${disk}${opts} "
		nextslot=$((nextslot + 1))
		i=$((i + 1))
	done

	i=0
	while [ $i -lt $pass_total ] ; do
		eval "pass=\$pass_dev${i}"
		devargs="$devargs -s $nextslot:0,passthru,${pass} "
		nextslot=$((nextslot + 1))
		i=$((i + 1))
	done

	gdb_opt=""
	[ -n "$gdbport" ] && gdb_opt="-G ${gdbport}"

	efiargs=""
	if [ ${efi_mode} -gt 0 ]; then
		efiargs="-s 29,fbuf,tcp=${vnchost}:${vncport},${vncsize}${vncwait}"
		efiargs="${efiargs} -l bootrom,${efi_firmware}"
		efiargs="${efiargs} ${tablet}"
		# The firmware scripts/build-uefi-firmware.sh builds (edk2
		# 2022.11) does not enumerate PCI: it needs the BARs decoding,
		# which bhyve, like rhyve, leaves off with a boot ROM.
		efiargs="${efiargs} -o pci.enable_bars=true"
	fi

	# shellcheck disable=SC2086
	if [ -n "$kernel_cmdline" ]; then
		${BHYVE} -c "${cpus}" -m "${memsize}" ${apic_opt} -A ${bhyverun_opt} ${gdb_opt} \
			-s 0:0,hostbridge -s 1:0,lpc ${efiargs} ${devargs} -l "com1,${console}" \
			${installer_opt} ${boot_opt} -o "boot.cmdline=${kernel_cmdline}" "${vmname}"
	else
		${BHYVE} -c "${cpus}" -m "${memsize}" ${apic_opt} -A ${bhyverun_opt} ${gdb_opt} \
			-s 0:0,hostbridge -s 1:0,lpc ${efiargs} ${devargs} -l "com1,${console}" \
			${installer_opt} ${boot_opt} "${vmname}"
	fi
	bhyve_exit=$?
	# bhyve returns the following status codes:
	#  0 - VM has been reset
	#  1 - VM has been powered off
	#  2 - VM has been halted
	#  3 - VM generated a triple fault
	#  all other non-zero status codes are errors
	if [ $bhyve_exit -ne 0 ] || [ $stopping -eq 1 ]; then
		break
	fi
done

case $bhyve_exit in
	0|1|2)
		# Cleanup the VM's registry entry when bhyve did not exit due
		# to an error.
		${BHYVECTL} --vm="${vmname}" --destroy > /dev/null 2>&1
		;;
esac

exit $bhyve_exit
