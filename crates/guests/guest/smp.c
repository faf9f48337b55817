/*
 * smp: start the application processors the way an OS does.
 *
 * Copies the real-mode trampoline to 0x8000 and sends INIT, then SIPI
 * twice, to all CPUs but itself through the xAPIC ICR.  Each AP switches
 * to 32-bit protected mode, prints "ap <APIC ID> up" (COM1 is shared
 * under the print lock) and idles with interrupts on.  The BSP waits (up
 * to about 2 s) for as many CPUs as the MADT lists and prints
 * "cpus <n>".  A second SIPI reaching an AP already running is ignored
 * by the CPU, so each AP says "up" once.
 */
#include "rt.h"

#define TRAMPOLINE 0x8000
#define ICR_LOW 0x300
#define ICR_HIGH 0x310
#define ICR_PENDING (1u << 12)
#define ICR_INIT 0x00000500u
#define ICR_STARTUP 0x00000600u
#define ICR_ASSERT (1u << 14)
#define ICR_ALL_BUT_SELF (3u << 18)

static volatile uint32_t cpus_up = 1;

static void ap(void)
{
	lapic_enable();
	print("ap %u up\n", lapic_id());
	atomic_inc(&cpus_up);
}

static void send_ipi(uint32_t low)
{
	mmio_write32(LAPIC_BASE + ICR_HIGH, 0);
	mmio_write32(LAPIC_BASE + ICR_LOW, low);
	while (mmio_read32(LAPIC_BASE + ICR_LOW) & ICR_PENDING)
		;
}

void guest_main(void)
{
	uint32_t expected = acpi_madt_cpus();
	if (expected == 0)
		fail("no MADT or no CPUs in it");
	pic_mask_all();
	lapic_enable();
	print("bsp %u, madt lists %u cpus\n", lapic_id(), expected);

	ap_main = ap;
	uint8_t vector = smp_install_trampoline(TRAMPOLINE);
	send_ipi(ICR_ALL_BUT_SELF | ICR_ASSERT | ICR_INIT);
	pm_delay_us(10000);
	send_ipi(ICR_ALL_BUT_SELF | ICR_ASSERT | ICR_STARTUP | vector);
	pm_delay_us(200);
	send_ipi(ICR_ALL_BUT_SELF | ICR_ASSERT | ICR_STARTUP | vector);

	uint32_t start = pm_timer();
	while (cpus_up < expected && pm_timer() - start < 2 * 3579545u)
		;
	/* Let a late AP's line finish before ours. */
	pm_delay_us(1000);
	print("cpus %u\n", cpus_up);
	if (cpus_up != expected)
		fail("%u of %u CPUs came up", cpus_up, expected);
}
