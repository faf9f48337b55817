/*
 * cpuid: what the guest's CPUID says about the hypervisor and the -c
 * topology, as bhyve presents it.
 *
 * Prints:
 *   cpuid hypervisor 'bhyve bhyve ' max 0x40000001
 *   cpuid leaf1 apic 0 logical 4 x2apic 0
 *   cpuid leafb 0 shift 1 count 2 type 1
 *   cpuid leafb 1 shift 2 count 4 type 2
 */
#include "rt.h"

static void cpuid(uint32_t leaf, uint32_t sub, uint32_t r[4])
{
	__asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
}

void guest_main(void)
{
	uint32_t r[4];
	char sig[13];

	cpuid(0x40000000, 0, r);
	memcpy(sig, &r[1], 4);
	memcpy(sig + 4, &r[2], 4);
	memcpy(sig + 8, &r[3], 4);
	sig[12] = 0;
	print("cpuid hypervisor '%s' max 0x%x\n", sig, r[0]);
	cpuid(1, 0, r);
	print("cpuid leaf1 apic %u logical %u x2apic %u\n", r[1] >> 24, (r[1] >> 16) & 0xff, (r[2] >> 21) & 1);
	cpuid(0, 0, r);
	if (r[0] >= 0xb) {
		for (uint32_t level = 0; level < 2; level++) {
			cpuid(0xb, level, r);
			print("cpuid leafb %u shift %u count %u type %u\n", level, r[0] & 0x1f, r[1] & 0xffff,
			      (r[2] >> 8) & 0xff);
		}
	}
	poweroff();
}
