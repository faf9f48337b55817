/*
 * cmos: the RTC/CMOS as bhyve fills it.
 *
 * Prints the memory-size cells bhyve writes for its UEFI firmware:
 *   cmos lowmem 0x1e00      (0x34/0x35: 64 KiB chunks between 16 MiB and lowmem)
 *   cmos highmem 0x008000   (0x5B-0x5D: 64 KiB chunks above 4 GiB)
 * and the wall clock, read when no update is in progress and read again
 * until two reads agree (honouring register B's BCD and 12-hour modes):
 *   rtc 2026-11-22 01:57:34
 * With "periodic" on the command line it then turns on the RTC's periodic
 * interrupt (1024 Hz, IRQ 8 through the IOAPIC), which bhyve's RTC timer
 * thread raises, and counts them for up to a second:
 *   rtc periodic irqs 16
 */
#include "rt.h"

static uint8_t cmos(uint8_t reg)
{
	outb(RTC_INDEX_PORT, reg);
	return inb(RTC_DATA_PORT);
}

struct rtc_time {
	uint8_t sec, min, hour, day, mon, year, century;
};

static void read_raw(struct rtc_time *t)
{
	/* Register A bit 7: update in progress; the time registers are
	 * stable for at least 244 us after it reads clear. */
	while (cmos(0x0A) & 0x80)
		;
	t->sec = cmos(0x00);
	t->min = cmos(0x02);
	t->hour = cmos(0x04);
	t->day = cmos(0x07);
	t->mon = cmos(0x08);
	t->year = cmos(0x09);
	t->century = cmos(0x32); /* FADT's century register */
}

static uint8_t from_bcd(uint8_t v)
{
	return (uint8_t)((v >> 4) * 10 + (v & 0x0F));
}

#define RTC_IRQ 8
#define RTC_VECTOR 0x38
#define PERIODIC_IRQS 16

static volatile uint32_t rtc_irqs;

static void rtc_irq(uint32_t vector)
{
	(void)vector;
	if (cmos(0x0C) & 0x40) /* register C: reading acknowledges; PF */
		rtc_irqs++;
	lapic_eoi();
}

static void periodic(void)
{
	pic_mask_all();
	lapic_enable();
	set_irq_handler(RTC_VECTOR, rtc_irq);
	ioapic_route(RTC_IRQ, RTC_VECTOR, 0, lapic_id());
	outb(RTC_INDEX_PORT, 0x0A);
	outb(RTC_DATA_PORT, (uint8_t)((cmos(0x0A) & 0xF0) | 6)); /* rate 6: 1024 Hz */
	uint8_t regb = cmos(0x0B);
	(void)cmos(0x0C);
	outb(RTC_INDEX_PORT, 0x0B);
	outb(RTC_DATA_PORT, (uint8_t)(regb | 0x40)); /* PIE */
	sti();
	uint32_t start = pm_timer();
	while (rtc_irqs < PERIODIC_IRQS && pm_timer() - start < 3579545u)
		;
	cli();
	if (rtc_irqs < PERIODIC_IRQS)
		fail("%u periodic RTC interrupts in a second", rtc_irqs);
	print("rtc periodic irqs %u\n", PERIODIC_IRQS);
}

void guest_main(void)
{
	uint32_t lowmem = cmos(0x34) | ((uint32_t)cmos(0x35) << 8);
	uint32_t highmem = cmos(0x5B) | ((uint32_t)cmos(0x5C) << 8) | ((uint32_t)cmos(0x5D) << 16);
	print("cmos lowmem 0x%04x\n", lowmem);
	print("cmos highmem 0x%06x\n", highmem);

	struct rtc_time a, b;
	read_raw(&b);
	do {
		a = b;
		read_raw(&b);
	} while (memcmp(&a, &b, sizeof(a)) != 0);

	uint8_t regb = cmos(0x0B);
	int binary = regb & 0x04, h24 = regb & 0x02;
	int pm = !h24 && (a.hour & 0x80);
	a.hour &= 0x7F;
	if (!binary) {
		a.sec = from_bcd(a.sec);
		a.min = from_bcd(a.min);
		a.hour = from_bcd(a.hour);
		a.day = from_bcd(a.day);
		a.mon = from_bcd(a.mon);
		a.year = from_bcd(a.year);
		a.century = from_bcd(a.century);
	}
	if (!h24)
		a.hour = (uint8_t)(a.hour % 12 + (pm ? 12 : 0));
	print("rtc %02u%02u-%02u-%02u %02u:%02u:%02u\n", a.century, a.year, a.mon, a.day, a.hour,
	      a.min, a.sec);
	if (cmdline_has_word("periodic"))
		periodic();
}
