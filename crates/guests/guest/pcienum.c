/*
 * pcienum: list every function on PCI bus 0 twice, through configuration
 * mechanism #1 (0xCF8/0xCFC) and through ECAM (0xE0000000), and check the
 * two views agree register for register over the standard header.
 *
 * Prints, per function found through 0xCF8:
 *   pci 00:1f.0 8086:7000 class 060100
 * then, per function found through ECAM:
 *   ecam 00:1f.0 8086:7000 class 060100
 * then "pci agree N functions", or FAIL on any difference.
 */
#include "rt.h"

static uint32_t cf8_read(uint32_t dev, uint32_t fn, uint32_t reg)
{
	return pci_read32(dev, fn, reg);
}

static uint32_t ecam_read(uint32_t dev, uint32_t fn, uint32_t reg)
{
	return mmio_read32(PCI_ECAM_BASE | (dev << 15) | (fn << 12) | (reg & 0xFFC));
}

typedef uint32_t (*cfg_read)(uint32_t dev, uint32_t fn, uint32_t reg);

/* Print every function; returns how many. */
static uint32_t scan(const char *tag, cfg_read rd)
{
	uint32_t found = 0;
	for (uint32_t dev = 0; dev < 32; dev++) {
		for (uint32_t fn = 0; fn < 8; fn++) {
			uint32_t id = rd(dev, fn, 0);
			if ((id & 0xFFFF) == 0xFFFF) {
				if (fn == 0)
					break;
				continue;
			}
			uint32_t class = rd(dev, fn, 8) >> 8;
			print("%s 00:%02x.%u %04x:%04x class %06x\n", tag, dev, fn, id & 0xFFFF, id >> 16,
			      class);
			found++;
			/* Header type bit 7: more functions than 0. */
			if (fn == 0 && !(rd(dev, 0, 0x0C) & 0x00800000))
				break;
		}
	}
	return found;
}

void guest_main(void)
{
	uint32_t by_cf8 = scan("pci", cf8_read);
	uint32_t by_ecam = scan("ecam", ecam_read);
	if (by_cf8 != by_ecam)
		fail("0xCF8 found %u functions, ECAM %u", by_cf8, by_ecam);
	if (by_cf8 == 0)
		fail("no PCI functions");
	/* Every dword of every function's standard header reads the same both
	 * ways (registers with side effects on read have none in this range). */
	for (uint32_t dev = 0; dev < 32; dev++)
		for (uint32_t fn = 0; fn < 8; fn++) {
			if ((cf8_read(dev, fn, 0) & 0xFFFF) == 0xFFFF)
				continue;
			for (uint32_t reg = 0; reg < 0x40; reg += 4) {
				uint32_t a = cf8_read(dev, fn, reg), b = ecam_read(dev, fn, reg);
				if (a != b)
					fail("00:%02x.%u register %02x: 0xCF8 %08x, ECAM %08x", dev, fn, reg,
					     a, b);
			}
		}
	print("pci agree %u functions\n", by_cf8);
}
