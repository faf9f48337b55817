/*
 * The /init of rhyve's full Linux boot test: mount /proc, print the kernel
 * release and CPU count, the PCI functions Linux enumerated (the
 * first three hex fields of its /proc/bus/pci/devices, as
 * "pci <bus+devfn> <vendor+device> <irq>"),
 * print "BOOT-OK uptime <contents of /proc/uptime>" and power the machine off
 * (reboot(2) with POWER_OFF: the kernel enters ACPI S5, bhyve exits with
 * status 1).
 *
 * A static x86-64 program without libc, because it must make its system
 * calls in a way that works on software-virtualization hosts (PVM) as well
 * as on hardware.  What such a host does for a guest that is not PVM-aware
 * (shown by the `ring3` guest program, crates/guests/guest/ring3.c):
 *
 *   - 64-bit `syscall` jumps to LSTAR but stays in user mode, so the kernel
 *     takes a page fault on its own entry point and kills the process
 *     (every libc program dies on its first system call);
 *   - `int $0x80` from user mode raises #UD;
 *   - `syscall` from 32-bit (compatibility-mode) code reaches CSTAR at
 *     CPL 0 but with RIP cut to its low 32 bits (KVM's emulator writes
 *     RIP back in the width of the mode the instruction started in), and
 *     the kernel's `sysretl` comes back with the 64-bit user code segment
 *     instead of the 32-bit one.
 *
 * So every system call here is an ia32 one made from a compatibility-mode
 * stub with `syscall` (Linux's 32-bit SYSCALL ABI: EAX number, EBX, EBP,
 * EDX, ESI, EDI arguments; ECX is the return address).  Linux returns from
 * it to the 32-bit vDSO's int80 landing pad; with the 64-bit vDSO off
 * (`vdso=0`) this process has no vDSO and that address is the landing
 * pad's small offset, inside the page this program maps at address 0.
 * That page is a landing sled that works whichever mode the CPU comes back
 * in: in 64-bit mode it returns to the caller, in 32-bit mode (hardware
 * KVM, or a kernel returning through IRET) it far-jumps to 64-bit code
 * first.  Everything the kernel reads or writes, and the stack, lies below
 * 4 GiB, as the ia32 ABI needs.
 *
 * For the cut CSTAR, this program maps the 16 MiB at 0x81000000 (the low
 * halves of the kernel text addresses, which without KASLR start at
 * 0xffffffff81000000) with 16-byte stubs that sign-extend their own
 * address and jump there: to the kernel's entry_SYSCALL_compat, which
 * Linux aligns to 16 bytes.  R9 is free at that point (the compat entry
 * code neither reads nor returns R8-R15).  The kernel runs the stub from a
 * user page, so the guest needs `clearcpuid=smep,smap`.  The build maps one
 * 256 KiB block of stubs 64 times (build.rs adds the program headers: Linux
 * reads at most a page of them).
 *
 * `init --selftest` (run on the host by the test suite) checks the stub
 * blocks are mapped and drives the landing sled in both modes, without
 * making any system call through them.
 */

typedef unsigned long u64;
typedef unsigned int u32;

#define USER_CS64 0x33
#define USER_CS32 0x23
#define SLED_SIZE 4096

/* ia32 system call numbers (arch/x86/entry/syscalls/syscall_32.tbl). */
#define NR32_EXIT 1
#define NR32_READ 3
#define NR32_WRITE 4
#define NR32_OPEN 5
#define NR32_CLOSE 6
#define NR32_MOUNT 21
#define NR32_REBOOT 88
#define NR32_UNAME 122

#define LINUX_REBOOT_MAGIC1 0xfee1deadu
#define LINUX_REBOOT_MAGIC2 672274793u
#define LINUX_REBOOT_CMD_POWER_OFF 0x4321fedcu

/* Where build.rs maps the stub block again and again (see above). */
#define CSTAR_STUBS_BASE 0x81000000ul
#define CSTAR_STUBS_SIZE (16ul << 20)

long sys32(u32 nr, u32 a1, u32 a2, u32 a3, u32 a4, u32 a5);
extern const unsigned char cstar_stubs[];
void sled_selftest_64(u64 entry);
void sled_selftest_32(u64 entry);

__asm__(
	/* The landing sled at address 0: NOPs, then a tail that tells the
	 * modes apart.  `31 c9` clears ECX in both; `41` is INC ECX in 32-bit
	 * code and an (ignored) REX prefix on CLC in 64-bit code; `e3 07` is
	 * JECXZ/JRCXZ over the 32-bit far jump to the final RET. */
	"	.section .landing, \"ax\"\n"
	"	.globl sled_ret\n"
	"	.fill 4096 - 14, 1, 0x90\n"
	"	.byte 0x31, 0xc9\n"
	"	.byte 0x41, 0xf8\n"
	"	.byte 0xe3, 0x07\n"
	"	.byte 0xea\n"
	"	.long sled_ret\n"
	"	.word 0x33\n"
	"sled_ret:\n"
	"	ret\n"

	/* 16384 stubs of 16 bytes: lea -7(%rip) is the stub's own address. */
	"	.section .cstar_stubs, \"ax\"\n"
	"	.globl cstar_stubs\n"
	"cstar_stubs:\n"
	"	.rept 16384\n"
	"	lea -7(%rip), %r9\n"
	"	movslq %r9d, %r9\n"
	"	jmp *%r9\n"
	"	nop; nop; nop\n"
	"	.endr\n"

	"	.text\n"
	"	.code64\n"
	"	.globl _start\n"
	"_start:\n"
	"	mov (%rsp), %rdi\n" /* argc */
	"	lea 8(%rsp), %rsi\n" /* argv */
	"	mov $low_stack_top, %esp\n"
	"	call main\n"
	"	mov %eax, %edi\n"
	"	mov $60, %eax\n" /* exit (only reached in --selftest on the host) */
	"	syscall\n"
	"	ud2\n"

	/* long sys32(nr, a1..a5): callee-saved registers and RSP kept in
	 * memory (the kernel does not restore R8-R15 on this path). */
	"	.globl sys32\n"
	"sys32:\n"
	"	mov %rbx, saved_regs + 0\n"
	"	mov %rbp, saved_regs + 8\n"
	"	mov %r12, saved_regs + 16\n"
	"	mov %r13, saved_regs + 24\n"
	"	mov %r14, saved_regs + 32\n"
	"	mov %r15, saved_regs + 40\n"
	"	mov %rsp, saved_regs + 48\n"
	"	mov %edi, %eax\n"
	"	mov %esi, %ebx\n"
	"	mov %edx, %ebp\n"
	"	mov %ecx, %edx\n"
	"	mov %r8d, %esi\n"
	"	mov %r9d, %edi\n"
	"	pushq $sys32_back\n" /* for the sled's RET */
	"	pushq $0x23\n"
	"	pushq $sys32_compat\n"
	"	lretq\n"
	"	.code32\n"
	"sys32_compat:\n"
	"	syscall\n"
	"	ud2\n"
	"	.code64\n"
	"sys32_back:\n"
	"	mov saved_regs + 0, %rbx\n"
	"	mov saved_regs + 8, %rbp\n"
	"	mov saved_regs + 16, %r12\n"
	"	mov saved_regs + 24, %r13\n"
	"	mov saved_regs + 32, %r14\n"
	"	mov saved_regs + 40, %r15\n"
	"	mov saved_regs + 48, %rsp\n"
	"	cltq\n"
	"	ret\n"

	/* Enter the sled at `entry` in 64-bit mode, as a buggy sysretl does. */
	"	.globl sled_selftest_64\n"
	"sled_selftest_64:\n"
	"	pushq $1f\n"
	"	jmp *%rdi\n"
	"1:	ret\n"
	/* ... and in 32-bit mode, as sysretl does on hardware. */
	"	.globl sled_selftest_32\n"
	"sled_selftest_32:\n"
	"	pushq $2f\n"
	"	pushq $0x23\n"
	"	push %rdi\n"
	"	lretq\n"
	"2:	ret\n"

	"	.bss\n"
	"	.balign 16\n"
	"saved_regs:\n"
	"	.skip 64\n"
	"low_stack:\n"
	"	.skip 65536\n"
	"low_stack_top:\n"
	"	.text\n");

static char buf[65536];
static char line[512];

static u32 str_len(const char *s)
{
	u32 n = 0;
	while (s[n])
		n++;
	return n;
}

static void put(const char *s)
{
	sys32(NR32_WRITE, 1, (u32)(u64)s, str_len(s), 0, 0);
}

static char *append(char *at, const char *s)
{
	while (*s)
		*at++ = *s++;
	*at = 0;
	return at;
}

static char *append_u32(char *at, u32 v)
{
	char digits[12];
	int n = 0;
	do {
		digits[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (n)
		*at++ = digits[--n];
	*at = 0;
	return at;
}

static void fail(const char *what, long err)
{
	char *at = append(line, "init: ");
	at = append(at, what);
	at = append(at, " failed: errno ");
	at = append_u32(at, (u32)-err);
	append(at, "\n");
	put(line);
	sys32(NR32_EXIT, 1, 0, 0, 0, 0);
}

/* The whole file into buf (NUL-terminated); its length. */
static u32 read_file(const char *path)
{
	long fd = sys32(NR32_OPEN, (u32)(u64)path, 0, 0, 0, 0);
	u32 len = 0;
	if (fd < 0)
		fail(path, fd);
	for (;;) {
		long n = sys32(NR32_READ, (u32)fd, (u32)(u64)(buf + len), sizeof(buf) - 1 - len, 0, 0);
		if (n < 0)
			fail(path, n);
		if (n == 0 || len + (u64)n >= sizeof(buf) - 1) {
			len += (u32)n;
			break;
		}
		len += (u32)n;
	}
	buf[len] = 0;
	sys32(NR32_CLOSE, (u32)fd, 0, 0, 0, 0);
	return len;
}

static int str_eq(const char *a, const char *b)
{
	while (*a && *a == *b)
		a++, b++;
	return *a == *b;
}

/* The next whitespace-separated field of a /proc table, copied to out. */
static const char *next_field(const char *p, char *out, u32 size)
{
	u32 n = 0;
	while (*p == ' ' || *p == '\t')
		p++;
	while (*p && *p != ' ' && *p != '\t' && *p != '\n') {
		if (n + 1 < size)
			out[n++] = *p;
		p++;
	}
	out[n] = 0;
	return p;
}

static const char *next_line(const char *p)
{
	while (*p && *p != '\n')
		p++;
	return *p ? p + 1 : p;
}

/* "pci <bus+devfn> <vendor+device> <irq>" per function, in hex as Linux
 * lists them. */
static void print_pci_functions(void)
{
	char devfn[16], ids[16], irq[16];
	read_file("/proc/bus/pci/devices");
	for (const char *p = buf; *p; p = next_line(p)) {
		const char *q = next_field(p, devfn, sizeof(devfn));
		q = next_field(q, ids, sizeof(ids));
		next_field(q, irq, sizeof(irq));
		char *at = append(line, "pci ");
		at = append(at, devfn);
		at = append(at, " ");
		at = append(at, ids);
		at = append(at, " ");
		at = append(at, irq);
		append(at, "\n");
		put(line);
	}
}

int main(long argc, char **argv)
{
	static struct {
		char sysname[65], nodename[65], release[65], version[65], machine[65], domainname[65];
	} uts;
	long err;
	u32 cpus = 0;
	char *at;

	if (argc > 1 && str_eq(argv[1], "--selftest")) {
		/* Every offset of the sled must come back, in both modes. */
		/* The stub blocks map where the kernel text's low halves are. */
		const unsigned char *stub = (const unsigned char *)CSTAR_STUBS_BASE;
		for (u64 at = 0; at < CSTAR_STUBS_SIZE; at += CSTAR_STUBS_SIZE / 7 & ~15ul)
			for (int i = 0; i < 16; i++)
				if (stub[at + i] != cstar_stubs[i])
					return 2;
		for (u64 entry = 0; entry <= SLED_SIZE - 14; entry += entry + 97 > SLED_SIZE - 14 && entry < SLED_SIZE - 14 ? SLED_SIZE - 14 - entry : 97) {
			sled_selftest_64(entry);
			sled_selftest_32(entry);
		}
		return 0;
	}

	/* Fault the stub pages in from user mode first: the kernel reaches
	 * them at CPL 0 on the user's stack, where a page fault before its
	 * entry code switches stacks and GS would be a double fault. */
	for (u64 at = 0; at < CSTAR_STUBS_SIZE; at += 4096)
		(void)*(volatile const unsigned char *)(CSTAR_STUBS_BASE + at);

	err = sys32(NR32_MOUNT, (u32)(u64) "proc", (u32)(u64) "/proc", (u32)(u64) "proc", 0, 0);
	if (err < 0)
		fail("mount /proc", err);
	err = sys32(NR32_UNAME, (u32)(u64)&uts, 0, 0, 0, 0);
	if (err < 0)
		fail("uname", err);
	read_file("/proc/cpuinfo");
	for (const char *p = buf; *p; p++)
		if ((p == buf || p[-1] == '\n') && p[0] == 'p' && p[1] == 'r' && p[2] == 'o' && p[3] == 'c' &&
		    p[4] == 'e' && p[5] == 's' && p[6] == 's' && p[7] == 'o' && p[8] == 'r')
			cpus++;
	at = append(line, "rhyve full-boot guest: ");
	at = append(at, uts.sysname);
	at = append(at, " ");
	at = append(at, uts.release);
	at = append(at, ", ");
	at = append_u32(at, cpus);
	append(at, " CPU(s), system calls through the ia32 ABI\n");
	put(line);

	print_pci_functions();

	read_file("/proc/uptime");
	at = append(line, "BOOT-OK uptime ");
	append(at, buf);
	put(line);

	err = sys32(NR32_REBOOT, LINUX_REBOOT_MAGIC1, LINUX_REBOOT_MAGIC2, LINUX_REBOOT_CMD_POWER_OFF, 0, 0);
	fail("reboot(POWER_OFF)", err);
	return 1;
}
