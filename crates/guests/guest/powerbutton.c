/*
 * powerbutton: wait for the ACPI power button (bhyve presses it when it
 * gets SIGTERM after the guest enabled ACPI), then power off.
 *
 * Enables ACPI through SMI_CMD, PWRBTN_EN in PM1_EN, routes the SCI
 * (ISA IRQ 9 = GSI 9, level, active low as the MADT override says) through
 * the IOAPIC, prints "ready" and waits with interrupts on.  The SCI handler
 * reads PM1_STS, checks PWRBTN_STS, clears it, prints "power button" and
 * enters S5: exit 1.
 *
 * With "noacpi" on the command line it leaves ACPI off, prints "ready" and
 * idles: bhyve then has no power button, and SIGTERM ends it as a signal.
 */
#include "rt.h"

#define SCI_VECTOR 0x39

static void sci(uint32_t vector)
{
	(void)vector;
	uint16_t sts = inw(PM1_STS_PORT);
	if (!(sts & PM1_PWRBTN))
		fail("SCI without PWRBTN_STS (PM1_STS=%04x)", sts);
	outw(PM1_STS_PORT, PM1_PWRBTN); /* write 1 to clear */
	sts = inw(PM1_STS_PORT);
	if (sts & PM1_PWRBTN)
		fail("PWRBTN_STS did not clear (PM1_STS=%04x)", sts);
	lapic_eoi();
	print("power button\n");
	poweroff();
}

void guest_main(void)
{
	if (cmdline_has_word("noacpi")) {
		print("ready\n");
		idle_forever();
	}
	pic_mask_all();
	lapic_enable();
	set_irq_handler(SCI_VECTOR, sci);
	acpi_enable();
	if (!(inw(PM1_CNT_PORT) & 1))
		fail("SCI_EN not set after ACPI enable");
	outw(PM1_EN_PORT, PM1_PWRBTN);
	if (inw(PM1_EN_PORT) != PM1_PWRBTN)
		fail("PM1_EN reads %04x", inw(PM1_EN_PORT));
	ioapic_route(SCI_IRQ, SCI_VECTOR, IOAPIC_LEVEL | IOAPIC_ACTIVE_LOW, lapic_id());
	print("ready\n");
	idle_forever();
}
