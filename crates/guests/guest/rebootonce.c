/*
 * rebootonce: reset the VM once, then power it off, remembering across the
 * reset in RTC NVRAM (byte 0x50). bhyve's RTC lives in the kernel VM, which
 * outlives each bhyve process, so this is what vmrun.sh's restart loop
 * sees: bhyve exits 0, vmrun.sh boots again, bhyve exits 1.
 *
 * Prints "rebootonce: boot N" (N = 1, 2) and then either resets (0xCF9) or
 * powers off (S5).
 */
#include "rt.h"

#define NVRAM_BOOT_COUNT 0x50

static uint8_t cmos_read(uint8_t reg)
{
	outb(RTC_INDEX_PORT, reg);
	return inb(RTC_DATA_PORT);
}

static void cmos_write(uint8_t reg, uint8_t value)
{
	outb(RTC_INDEX_PORT, reg);
	outb(RTC_DATA_PORT, value);
}

void guest_main(void)
{
	uint8_t boots = cmos_read(NVRAM_BOOT_COUNT) + 1;

	cmos_write(NVRAM_BOOT_COUNT, boots);
	print("rebootonce: boot %u\n", boots);
	if (boots == 1) {
		outb(RESET_PORT, 6);
		for (int i = 0; i < 2000; i++)
			inb(0x80);
		fail("reset through 0xCF9 did not end the VM");
	}
	cmos_write(NVRAM_BOOT_COUNT, 0);
	poweroff();
}
