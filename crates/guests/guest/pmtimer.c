/*
 * pmtimer: the ACPI PM timer's rate, measured against the RTC.
 *
 * Waits for the RTC seconds register to change, reads the PM timer
 * (port 0x408, 32 bits per the FADT's TMR_VAL_EXT), waits for the next
 * change four seconds later and reads it again.  Each edge is bracketed by
 * PM timer reads and must be pinned down to 20 ms, so the count is four
 * seconds' worth to within 0.25% even on a busy host:
 *   pmtimer hz 3579545
 */
#include "rt.h"

static uint8_t rtc_seconds(void)
{
	outb(RTC_INDEX_PORT, 0x00);
	return inb(RTC_DATA_PORT);
}

/*
 * Poll until the seconds register changes.  The change happened between
 * the PM timer read before the last unchanged seconds read and the one
 * after the changed read: *edge gets the middle, and the function returns
 * the width of that window in ticks (large if this vCPU was descheduled
 * at the wrong moment).
 */
static uint32_t next_second(uint32_t *edge)
{
	uint8_t s = rtc_seconds();
	uint32_t before_prev = pm_timer();
	for (;;) {
		uint32_t before = pm_timer();
		uint8_t now = rtc_seconds();
		uint32_t after = pm_timer();
		if (now != s) {
			*edge = before_prev + (after - before_prev) / 2;
			return after - before_prev;
		}
		before_prev = before;
	}
}

void guest_main(void)
{
	uint32_t t0 = pm_timer();
	uint32_t t1 = pm_timer();
	if (t0 == t1 && pm_timer() == t0)
		fail("the PM timer does not run (%08x)", t0);
	/* Both edges must be pinned down to 20 ms (0.25% of four seconds); a
	 * host busy enough to stretch a window gets a few more tries. */
	for (int attempt = 0; attempt < 5; attempt++) {
		uint32_t start, skipped, end;
		uint32_t w1 = next_second(&start);
		for (int s = 0; s < 3; s++)
			next_second(&skipped);
		uint32_t w2 = next_second(&end);
		if (w1 < 71600 && w2 < 71600) {
			print("pmtimer hz %u\n", (end - start) / 4);
			return;
		}
	}
	fail("could not time four RTC seconds to 20 ms in 5 tries");
}
