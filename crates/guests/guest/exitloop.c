/*
 * exitloop: the cost of an exit to user space, for bench/sandbox.sh.
 *
 * With "exits=N" on the command line, reads an unassigned I/O port N times
 * (each read leaves the guest for bhyve, which answers all ones) between
 * two ACPI PM timer reads (3.579545 MHz, 32 bits), and prints:
 *   exitloop exits N ticks T
 */
#include "rt.h"

#define UNASSIGNED_PORT 0x2f0

void guest_main(void)
{
	size_t len;
	const char *value = cmdline_value("exits", &len);
	int ok = 1;
	uint32_t exits = value ? parse_u32(value, len, &ok) : 0;
	if (!ok)
		fail("exits= is not a number");
	uint32_t start = pm_timer();
	for (uint32_t i = 0; i < exits; i++) {
		if (inb(UNASSIGNED_PORT) != 0xff)
			fail("port %x is assigned", UNASSIGNED_PORT);
	}
	uint32_t ticks = pm_timer() - start;
	print("exitloop exits %u ticks %u\n", exits, ticks);
}
