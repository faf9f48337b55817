/*
 * acpitables: find and check the ACPI tables the way an OS does.
 *
 * Scans 0xE0000-0xFFFFF for "RSD PTR ", checks the RSDP checksum (first 20
 * bytes) and extended checksum (whole structure), walks the XSDT (and the
 * RSDT, which must list the same tables), checksums every table, follows
 * the FADT to the DSDT and FACS, and decodes the MADT.  Prints:
 *   rsdp 0x000f2400 rev 2
 *   xsdt 5 entries
 *   table FACP            (one line per XSDT entry, in order)
 *   table DSDT            (through the FADT)
 *   table FACS
 *   madt lapic 0 id 0     (per enabled Processor Local APIC)
 *   madt ioapic id 0 addr 0xfec00000 gsi 0
 *   madt override irq 9 gsi 9 flags 000f
 *   madt lapics 2
 *   acpi ok
 * and FAIL: on the first bad checksum or structure.
 */
#include "rt.h"

static void check_table(const struct acpi_header *t, const char *what)
{
	if (t->length < sizeof(*t) || t->length > 0x100000)
		fail("%s: implausible length %u", what, t->length);
	if (checksum8(t, t->length) != 0)
		fail("%s %c%c%c%c: bad checksum", what, t->signature[0], t->signature[1],
		     t->signature[2], t->signature[3]);
}

static void print_sig(const char *prefix, const char *sig)
{
	print("%s %c%c%c%c\n", prefix, sig[0], sig[1], sig[2], sig[3]);
}

static uint32_t low32(uint64_t addr, const char *what)
{
	if (addr == 0 || addr >= 0x100000000ull)
		fail("%s at %x%08x, not in the low 4 GiB", what, (uint32_t)(addr >> 32), (uint32_t)addr);
	return (uint32_t)addr;
}

static void decode_madt(const struct acpi_header *madt)
{
	const uint8_t *p = (const uint8_t *)madt + sizeof(*madt) + 8;
	const uint8_t *end = (const uint8_t *)madt + madt->length;
	uint32_t lapics = 0;
	while (p < end) {
		if (p + 2 > end || p[1] < 2 || p + p[1] > end)
			fail("MADT entry at offset %u overruns the table",
			     (uint32_t)(p - (const uint8_t *)madt));
		switch (p[0]) {
		case 0: /* Processor Local APIC: uid, APIC ID, flags */
			if (p[4] & 1) {
				print("madt lapic %u id %u\n", p[2], p[3]);
				lapics++;
			}
			break;
		case 1: { /* I/O APIC: id, reserved, address, GSI base */
			uint32_t addr, gsi;
			memcpy(&addr, p + 4, 4);
			memcpy(&gsi, p + 8, 4);
			print("madt ioapic id %u addr 0x%08x gsi %u\n", p[2], addr, gsi);
			break;
		}
		case 2: { /* Interrupt Source Override: bus, source, GSI, flags */
			uint32_t gsi;
			uint16_t flags;
			memcpy(&gsi, p + 4, 4);
			memcpy(&flags, p + 8, 2);
			print("madt override irq %u gsi %u flags %04x\n", p[3], gsi, flags);
			break;
		}
		case 4: /* Local APIC NMI: uid, flags, LINT# */
			print("madt lapic-nmi uid %02x lint %u\n", p[2], p[5]);
			break;
		default:
			print("madt entry type %u\n", p[0]);
			break;
		}
		p += p[1];
	}
	print("madt lapics %u\n", lapics);
}

void guest_main(void)
{
	const struct acpi_rsdp *rsdp = acpi_find_rsdp();
	if (!rsdp)
		fail("no RSDP in 0xE0000-0xFFFFF");
	if (checksum8(rsdp, 20) != 0)
		fail("RSDP checksum");
	if (rsdp->revision < 2)
		fail("RSDP revision %u has no XSDT", rsdp->revision);
	if (rsdp->length < sizeof(*rsdp) || checksum8(rsdp, rsdp->length) != 0)
		fail("RSDP extended checksum (length %u)", rsdp->length);
	print("rsdp 0x%08x rev %u\n", (uint32_t)rsdp, rsdp->revision);

	const struct acpi_header *xsdt =
		(const struct acpi_header *)low32(rsdp->xsdt_address, "XSDT");
	if (!str_eq_n(xsdt->signature, "XSDT", 4))
		fail("XSDT signature");
	check_table(xsdt, "XSDT");
	const struct acpi_header *rsdt = (const struct acpi_header *)rsdp->rsdt_address;
	if (!str_eq_n(rsdt->signature, "RSDT", 4))
		fail("RSDT signature");
	check_table(rsdt, "RSDT");

	uint32_t n = (xsdt->length - sizeof(*xsdt)) / 8;
	if ((rsdt->length - sizeof(*rsdt)) / 4 != n)
		fail("RSDT lists %u tables, XSDT %u", (rsdt->length - sizeof(*rsdt)) / 4, n);
	print("xsdt %u entries\n", n);

	const uint8_t *xe = (const uint8_t *)xsdt + sizeof(*xsdt);
	const uint8_t *re = (const uint8_t *)rsdt + sizeof(*rsdt);
	const struct acpi_header *fadt = NULL, *madt = NULL;
	for (uint32_t i = 0; i < n; i++) {
		uint64_t x;
		uint32_t r;
		memcpy(&x, xe + 8 * i, 8);
		memcpy(&r, re + 4 * i, 4);
		if (x != r)
			fail("XSDT entry %u is %08x, RSDT says %08x", i, (uint32_t)x, r);
		const struct acpi_header *t = (const struct acpi_header *)low32(x, "table");
		check_table(t, "table");
		print_sig("table", t->signature);
		if (str_eq_n(t->signature, "FACP", 4))
			fadt = t;
		if (str_eq_n(t->signature, "APIC", 4))
			madt = t;
	}
	if (!fadt)
		fail("no FADT");
	if (!madt)
		fail("no MADT");

	/* FADT: FIRMWARE_CTRL at 36, DSDT at 40, X_FIRMWARE_CTRL at 132,
	 * X_DSDT at 140 (the 64-bit fields win when set). */
	const uint8_t *f = (const uint8_t *)fadt;
	uint32_t dsdt32, facs32;
	uint64_t xdsdt = 0, xfacs = 0;
	memcpy(&facs32, f + 36, 4);
	memcpy(&dsdt32, f + 40, 4);
	if (fadt->length >= 148) {
		memcpy(&xfacs, f + 132, 8);
		memcpy(&xdsdt, f + 140, 8);
	}
	if (xdsdt && dsdt32 && xdsdt != dsdt32)
		fail("FADT DSDT %08x and X_DSDT %08x differ", dsdt32, (uint32_t)xdsdt);
	const struct acpi_header *dsdt =
		(const struct acpi_header *)low32(xdsdt ? xdsdt : dsdt32, "DSDT");
	if (!str_eq_n(dsdt->signature, "DSDT", 4))
		fail("FADT's DSDT pointer leads to no DSDT");
	check_table(dsdt, "table");
	print_sig("table", dsdt->signature);

	const char *facs = (const char *)low32(xfacs ? xfacs : facs32, "FACS");
	uint32_t facs_len;
	memcpy(&facs_len, facs + 4, 4);
	if (!str_eq_n(facs, "FACS", 4) || facs_len < 64)
		fail("FADT's FACS pointer leads to no FACS");
	print_sig("table", facs);

	decode_madt(madt);
	print("acpi ok\n");
}
