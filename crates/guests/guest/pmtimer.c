/*
 * pmtimer: the ACPI PM timer's rate, measured against the RTC.
 *
 * Waits for the RTC seconds register to change, reads the PM timer
 * (port 0x408, 32 bits per the FADT's TMR_VAL_EXT), waits for the next
 * change and reads it again.  Both edges are seen within one polling
 * round trip, so the count is within a few ticks of one second's worth:
 *   pmtimer hz 3579545
 */
#include "rt.h"

static uint8_t rtc_seconds(void)
{
	outb(RTC_INDEX_PORT, 0x00);
	return inb(RTC_DATA_PORT);
}

/* Poll until the seconds register changes; returns the PM timer then. */
static uint32_t next_second(void)
{
	uint8_t s = rtc_seconds();
	for (;;) {
		uint32_t t = pm_timer();
		if (rtc_seconds() != s)
			return t;
	}
}

void guest_main(void)
{
	uint32_t t0 = pm_timer();
	uint32_t t1 = pm_timer();
	if (t0 == t1 && pm_timer() == t0)
		fail("the PM timer does not run (%08x)", t0);
	uint32_t start = next_second();
	uint32_t end = next_second();
	print("pmtimer hz %u\n", end - start);
}
