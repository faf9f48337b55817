/*
 * exitcodes: end the VM in the way the command line names, to check
 * bhyve's exit status for each.
 *
 *   reset        write 6 to the reset register 0xCF9        -> exit 0
 *   kbdreset     i8042 pulse reset: 0xFE to port 0x64        -> exit 0
 *   poweroff     ACPI S5 through PM1a_CNT                    -> exit 1
 *   halt         cli; hlt                                    -> exit 2
 *   triplefault  exception with an empty IDT                 -> exit 3
 *   debugexit=N  N to pc-testdev's port 0xF4 (-l pc-testdev) -> exit 2N+1
 *   unknownmsr   rdmsr 0x40000200, which nothing implements: #GP, so
 *                FAIL and exit 3 (with bhyve -w: reads 0, then S5 -> exit 1)
 *   unassigned   read port 0x99, where nothing is: all ones, then S5
 *                -> exit 1 (with bhyve -e: the read ends the VM, exit 4)
 *
 * Prints "exitcodes: <mode>" first.  If the action does not end the VM,
 * prints "FAIL: ..." and triple-faults.
 */
#include "rt.h"

static void expect_gone(const char *mode)
{
	/* The exit is requested on the vCPU's exit to user space; give the
	 * VMM a moment to stop us before calling it a failure. */
	for (int i = 0; i < 2000; i++)
		inb(0x80);
	fail("%s did not end the VM", mode);
}

void guest_main(void)
{
	size_t len;
	const char *v;

	if (cmdline_has_word("reset")) {
		print("exitcodes: reset\n");
		outb(RESET_PORT, 6);
		expect_gone("reset through 0xCF9");
	}
	if (cmdline_has_word("kbdreset")) {
		print("exitcodes: kbdreset\n");
		outb(0x64, 0xFE);
		expect_gone("i8042 pulse reset");
	}
	if (cmdline_has_word("poweroff")) {
		print("exitcodes: poweroff\n");
		poweroff();
	}
	if (cmdline_has_word("unknownmsr")) {
		uint32_t lo, hi;
		print("exitcodes: unknownmsr\n");
		__asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(0x40000200u));
		print("exitcodes: msr 0x40000200 reads %x:%x\n", hi, lo);
		poweroff();
	}
	if (cmdline_has_word("unassigned")) {
		print("exitcodes: unassigned\n");
		print("exitcodes: port 0x99 reads %x\n", inb(0x99));
		poweroff();
	}
	if (cmdline_has_word("halt")) {
		print("exitcodes: halt\n");
		for (;;)
			__asm__ volatile("cli; hlt");
	}
	if (cmdline_has_word("triplefault")) {
		print("exitcodes: triplefault\n");
		triple_fault();
	}
	if ((v = cmdline_value("debugexit", &len))) {
		int ok;
		uint32_t n = parse_u32(v, len, &ok);
		if (!ok)
			fail("debugexit needs a number, got '%s'", v);
		print("exitcodes: debugexit %u\n", n);
		outl(DEBUG_EXIT_PORT, n);
		expect_gone("isa-debug-exit");
	}
	fail("no mode on the command line '%s' (reset kbdreset poweroff halt triplefault debugexit=N)",
	     cmdline());
}
